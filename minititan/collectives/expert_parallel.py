"""Expert parallelism: the ranks of an `ep` group each hold n_experts/ep of a MoE layer's experts,
and the tokens travel to their experts and back by all-to-all.

Every rank routes its own tokens and sorts the (token, expert) rows by expert. Then, per layer, the
exact exchange (the default):

  1. counts  all_to_all_single of the per-expert row counts (E/ep numbers per peer): now each rank
             knows how many rows every peer will send to each of its experts. The split sizes of
             the next all-to-all must be host ints, so this is the one host sync of the layer.
  2. dispatch all_to_all_single of the rows, variable split sizes. Rows for experts of rank r are
             contiguous (sorted by global expert), so rank r's chunk is one slice.
  3. permute  the received rows are ordered (source rank, local expert); reorder them to
             (local expert, source rank) so each local expert's rows are one block, and run the
             local experts (grouped GEMM or loop) on them.
  4. combine undo the permutation and all_to_all_single back with the split sizes swapped.

or the capped exchange (capacity_factor > 0, `capped_experts`): every rank sends every peer a fixed
number of rows, so no split size depends on the device and nothing waits for it; rows over that
capacity are dropped (and counted). It computes what the exact one does whenever nothing overflows.

Both all-to-alls are autograd Functions whose backward is the same exchange in reverse, so the
expert weights get the gradient of every token routed to them, from whichever rank it came.

Param layout: rank e of the ep group holds experts [e*E/ep, (e+1)*E/ep) of every "moe.experts.*"
tensor (a slice of dim 0); every other parameter is replicated over the ep group, whose ranks
see different tokens, so those gradients are summed over it like data parallel.

`ep_groups` folds ep into the data dims dp_shard x cp of a mesh: ep peers are consecutive in
that group; the ranks that hold the same experts form the group experts are FSDP-sharded over.

Only torch and the standard library (and the sibling mesh.py) are used, so this file can be copied.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .mesh import Mesh, new_groups


# ---------------------------------------------------------------- the param layout


def is_expert_param(name: str) -> bool:
    """Stacked expert weights, sliced over ep: layers.3.moe.experts.w1 (or moe.experts.w1)."""
    return ".moe.experts." in name or name.startswith("moe.experts.")


def expert_range(n_experts: int, ep_rank: int, ep: int) -> range:
    """The global expert ids rank ep_rank holds."""
    if n_experts % ep:
        raise ValueError(f"n_experts={n_experts} must be divisible by the expert-parallel degree ep={ep}")
    per_rank = n_experts // ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def shard_experts(params: dict[str, Tensor], ep_rank: int, ep: int) -> dict[str, Tensor]:
    """This rank's params: its slice (dim 0) of every expert tensor, every other tensor as is."""
    out = {}
    for name, t in params.items():
        if is_expert_param(name):
            mine = expert_range(t.shape[0], ep_rank, ep)
            t = t[mine.start:mine.stop].clone()
        out[name] = t
    return out


def ep_groups(mesh: Mesh, ep: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's ep group and expert data-parallel group (see ep_layout).
    Collective: every rank of the world must call it, in the same order."""
    ep_lists, expert_dp_lists = ep_layout(mesh, ep)
    return new_groups(ep_lists, mesh.rank, mesh.timeout), new_groups(expert_dp_lists, mesh.rank, mesh.timeout)


def ep_layout(mesh: Mesh, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """Fold ep into the data dims: split every dp_shard x cp group (size D, in its row-major
    order) into
        ep groups          D/ep groups of ep consecutive data ranks (neighbours: fast links)
        expert dp groups   ep groups of the D/ep data ranks that hold the same experts, strided
                           by ep: the expert weights are FSDP-sharded / their grads summed over it.
    Returns both lists of global ranks for the whole world."""
    size = mesh.size("dp_shard", "cp")
    if ep < 1 or size % ep:
        raise ValueError(f"parallelism.ep={ep} must divide dp_shard * cp = {size}: ep folds into the data dims")
    data_groups: dict[tuple, list[tuple[int, int]]] = {}
    for r in range(mesh.world_size):
        m = Mesh(mesh.sizes, r)
        others = tuple(c for d, c in m.coords.items() if d not in ("dp_shard", "cp"))
        data_groups.setdefault(others, []).append((m.local_rank("dp_shard", "cp"), r))
    ep_lists, expert_dp_lists = [], []
    for members in data_groups.values():
        ranks = [r for _, r in sorted(members)]
        ep_lists += [ranks[start:start + ep] for start in range(0, size, ep)]
        expert_dp_lists += [ranks[offset::ep] for offset in range(ep)]
    return ep_lists, expert_dp_lists


# ---------------------------------------------------------------- the token exchange


class Route(NamedTuple):
    """What combine needs to send the rows back where dispatch got them."""
    send_splits: list[int]  # rows this rank sent to each peer
    recv_splits: list[int]  # rows this rank got from each peer
    to_source_order: Tensor  # undoes the (source, expert) -> (expert, source) permutation


def dispatch(x: Tensor, counts: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, Route]:
    """x [n, dim] rows sorted by global expert, counts [E] rows per global expert (device int64).
    Returns this rank's rows sorted by its local experts, their counts [E/ep] (device), and the
    Route for combine."""
    ep = dist.get_world_size(group)
    if counts.numel() % ep:
        raise ValueError(f"n_experts={counts.numel()} must be divisible by the expert-parallel degree ep={ep}")
    per_rank = counts.numel() // ep
    received_counts = torch.empty_like(counts)  # [source, local expert] flattened
    dist.all_to_all_single(received_counts, counts, group=group)
    # the split sizes must be host ints: the layer's one sync
    splits = torch.cat([counts.view(ep, per_rank).sum(1), received_counts.view(ep, per_rank).sum(1)]).tolist()
    send_splits, recv_splits = splits[:ep], splits[ep:]

    received = _AllToAll.apply(x, recv_splits, send_splits, group)
    # block id of each received row: source * per_rank + local expert; sort by (expert, source)
    block = torch.repeat_interleave(torch.arange(ep * per_rank, device=x.device), received_counts,
                                    output_size=sum(recv_splits))
    to_expert_order = ((block % per_rank) * ep + block // per_rank).argsort(stable=True)
    local_counts = received_counts.view(ep, per_rank).sum(0)
    route = Route(send_splits, recv_splits, _inverse(to_expert_order))
    return received[to_expert_order], local_counts, route


def combine(y: Tensor, route: Route, group: dist.ProcessGroup) -> Tensor:
    """The local experts' outputs (local expert order) -> the rows this rank dispatched, in its order."""
    return _AllToAll.apply(y[route.to_source_order], route.send_splits, route.recv_splits, group)


def parallel_experts(run_local: Callable[[Tensor, Tensor, dict], Tensor], group: dist.ProcessGroup,
                     capacity_factor: float = 0.0, drop_log: Tensor | None = None) -> Callable[[Tensor, Tensor, dict], Tensor]:
    """Wrap run_local(x, counts, experts) -- the experts this rank holds -- into the same call
    over all experts of the ep group: dispatch, run the local experts, combine.

    capacity_factor 0: the exact exchange above (split sizes read on the host once per layer).
    capacity_factor c > 0: the capped exchange (capped_experts), no host sync; pairs over capacity
    are dropped, and if drop_log (a [2] running sum and count on the device) is given, each call adds
    the fraction it dropped and 1, in place."""
    def run(x: Tensor, counts: Tensor, experts: dict) -> Tensor:
        if capacity_factor > 0:
            return capped_experts(run_local, x, counts, experts, group, capacity_factor, drop_log)
        x_local, local_counts, route = dispatch(x, counts, group)
        return combine(run_local(x_local, local_counts, experts), route, group)
    return run


# ---------------------------------------------------------------- the capped exchange: no host sync


def capacity(n_rows: int, ep: int, capacity_factor: float, align: int = 16) -> int:
    """Rows a rank sends each peer: capacity_factor x the mean (n_rows / ep), rounded up to `align`
    (the grouped GEMM's row alignment), at most n_rows (a peer can never get more)."""
    mean = n_rows / ep
    return min(max(align, align * math.ceil(capacity_factor * mean / align)), align * math.ceil(n_rows / align))


def capped_experts(run_local, x: Tensor, counts: Tensor, experts: dict, group: dist.ProcessGroup,
                   capacity_factor: float, drop_log: Tensor | None = None) -> Tensor:
    """The exchange with every split size fixed on the host: each rank sends each peer exactly C rows
    (capacity), its first C rows for that peer's experts and filler after them, so the all-to-alls
    need no counts on the host and nothing waits for the device.

      1. counts   all_to_all of the rows kept per (peer, expert): the first C of each peer's chunk
                  (rows sorted by expert, so the later experts of an overfull chunk lose rows);
      2. rows     all_to_all of [ep x C, dim], equal splits;
      3. local    the receiver sorts its valid rows by (local expert, source), filler last (counted
                  into its last expert, whose outputs of it are never read), and runs its experts;
      4. back     the reverse all_to_all; each kept row takes its output, a dropped one zero.

    Drop-free whenever no rank sends a peer more than C rows: then every row's output is the exact
    exchange's (capacity_factor = ep can never drop: C = all rows). Dropped rows add nothing to their
    token, whose other experts keep their weights. Filler rows read row 0 of x: finite, and no
    gradient reaches them."""
    ep, n = dist.get_world_size(group), x.shape[0]
    per_rank = counts.numel() // ep
    cap = capacity(n, ep, capacity_factor)
    by_peer = counts.view(ep, per_rank)
    before = by_peer.cumsum(1) - by_peer  # rows of the same peer's earlier experts
    kept = torch.minimum(by_peer, (cap - before).clamp_min(0))  # [ep, per_rank]
    peer_start = by_peer.sum(1).cumsum(0) - by_peer.sum(1)  # first row of each peer's chunk in x
    slot = torch.arange(cap, device=x.device)
    valid = slot[None, :] < kept.sum(1, keepdim=True)  # [ep, cap]: which slots carry a row
    send_rows = torch.where(valid, peer_start[:, None] + slot[None, :], 0).flatten()

    received_kept = torch.empty_like(kept.flatten())  # [source, local expert]
    dist.all_to_all_single(received_kept, kept.flatten(), group=group)
    received = _AllToAll.apply(x[send_rows], [cap] * ep, [cap] * ep, group)

    # order the received rows by (local expert, source); filler rows (expert = per_rank) last
    received_kept = received_kept.view(ep, per_rank)
    ends = received_kept.cumsum(1)  # [source, expert]: end slot of each expert's rows in the source's chunk
    expert = torch.searchsorted(ends, slot.expand(ep, cap).contiguous(), right=True)  # per_rank = filler
    source = torch.arange(ep, device=x.device)[:, None].expand(ep, cap)
    to_expert_order = (expert * ep + source).flatten().argsort(stable=True)
    local_counts = received_kept.sum(0)
    local_counts[-1] += ep * cap - local_counts.sum()  # the filler rows go with the last expert
    y_local = run_local(received[to_expert_order], local_counts, experts)
    y_back = _AllToAll.apply(y_local[_inverse(to_expert_order)], [cap] * ep, [cap] * ep, group)

    # each sorted row of x: its slot in the returned buffer, if it was kept
    peer = torch.repeat_interleave(torch.arange(ep, device=x.device), by_peer.sum(1), output_size=n)
    row_in_chunk = torch.arange(n, device=x.device) - peer_start[peer]
    is_kept = row_in_chunk < kept.sum(1)[peer]
    if drop_log is not None:
        drop_log[0].add_(1 - is_kept.float().mean())
        drop_log[1].add_(1)
    y = y_back[torch.where(is_kept, peer * cap + row_in_chunk, 0)]
    return y * is_kept[:, None].to(y.dtype)


def _inverse(order: Tensor) -> Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows go out in in_splits chunks and arrive in out_splits chunks; the gradient goes back
    the same way reversed."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


"""The device mesh: which ranks talk to which, for each parallel dimension.

The world's ranks are laid out as a row-major grid over the dimensions

    pp  x  dp_replicate  x  dp_shard  x  cp  x  tp        (tp varies fastest)

so tensor-parallel peers are neighbours (same node, fastest links) and pipeline stages are
furthest apart. `mesh.group("dp_shard", "cp")` is the process group of the ranks that share
every *other* coordinate with this rank: the group FSDP shards over when it folds in cp.

Groups are made on first use with `torch.distributed.new_group`, which every rank must call
in the same order: ask for the same groups in the same order on all ranks (SPMD code does).
The other files of collectives/ take two things from here: `new_groups` (every rank makes every
group of a partition, keeps its own) and the names of the single-tensor collectives, which differ
between torch releases. Only torch is needed, so this file can be copied on its own.
"""
from __future__ import annotations

import itertools
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn);
# torch 2.11 has only the old names
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def init_distributed(device_type: str, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the job started by torchrun / srun / `minititan train --nproc` (env:// rendezvous),
    or make a one-rank group when started as a plain process. Returns (rank, world size)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    adopt_slurm_env()
    timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ:
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def adopt_slurm_env() -> None:
    """Under srun without torchrun, name this rank the way env:// expects (RANK, WORLD_SIZE)."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


def close_distributed() -> None:
    """Destroy the default process group (NCCL warns at exit about one left open). Only where every
    rank gets here alike: after an error of one rank alone, see cli.leave_alone."""
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_degrees(world_size: int, **degrees: int) -> dict[str, int]:
    """Fill the one -1 degree with what is left of the world; check the product."""
    sizes = {d: int(degrees.get(d, 1)) for d in DIMS}
    fill = [d for d, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one parallel degree may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if world_size % known:
            raise ValueError(f"world size {world_size} is not divisible by the other degrees "
                             f"({known}) so {fill[0]}=-1 cannot fill it")
        sizes[fill[0]] = world_size // known
    if math.prod(sizes.values()) != world_size:
        got = " x ".join(f"{d}={s}" for d, s in sizes.items() if s > 1) or "1"
        raise ValueError(f"parallel degrees {got} multiply to {math.prod(sizes.values())}, but the world has "
                         f"{world_size} ranks: make them multiply to {world_size} (or set one to -1)")
    return sizes


class Mesh:
    """Coordinates of this rank on the grid, and the process groups along any set of dims."""

    def __init__(self, sizes: dict[str, int], rank: int, timeout_s: float | None = None):
        self.sizes = {d: sizes.get(d, 1) for d in DIMS}
        self.timeout = timedelta(seconds=timeout_s) if timeout_s else None  # None: torch's default
        self.rank = rank
        self.world_size = math.prod(self.sizes.values())
        self.coords = dict(zip(DIMS, _unravel(rank, [self.sizes[d] for d in DIMS])))
        self.groups: dict[tuple[str, ...], dist.ProcessGroup] = {}  # the groups made so far, by their dims

    def size(self, *dims: str) -> int:
        return math.prod(self.sizes[d] for d in dims)

    def local_rank(self, *dims: str) -> int:
        """This rank's index within the group over `dims` (row-major over those dims)."""
        idx = 0
        for d in dims:
            idx = idx * self.sizes[d] + self.coords[d]
        return idx

    def group(self, *dims: str) -> dist.ProcessGroup:
        """The group of ranks that differ from this one only along `dims` (collective on first use)."""
        dims = tuple(d for d in DIMS if d in dims)
        if dims not in self.groups:
            self.groups[dims] = new_groups(self._enumerate(dims), self.rank, self.timeout)
        return self.groups[dims]

    def ranks(self, *dims: str) -> list[int]:
        """Global ranks of this rank's group over `dims`, in group-rank order."""
        dims = tuple(d for d in DIMS if d in dims)
        return next(m for m in self._enumerate(dims) if self.rank in m)

    def _enumerate(self, dims: tuple[str, ...]) -> list[list[int]]:
        """Every group over `dims`, by its lowest rank: a rank is the sum of coordinate x stride
        over the dims, so a group is its first rank plus the offsets its dims span."""
        strides = {d: math.prod(self.sizes[e] for e in DIMS[i + 1:]) for i, d in enumerate(DIMS)}

        def offsets(along):
            return [sum(c * strides[d] for c, d in zip(cs, along))
                    for cs in itertools.product(*(range(self.sizes[d]) for d in along))]
        inside = offsets(dims)
        return [[first + o for o in inside] for first in offsets([d for d in DIMS if d not in dims])]

    def __repr__(self):
        shown = ", ".join(f"{d}={s}" for d, s in self.sizes.items() if s > 1)
        return f"Mesh({shown}; {self.world_size} ranks)" if shown else "Mesh(one process)"


def new_groups(rank_lists: list[list[int]], rank: int, timeout: timedelta | None = None) -> dist.ProcessGroup:
    """Make one process group per list (a partition of the ranks) and return the one holding `rank`.
    Collective: every rank makes every group, in the same order, as torch.distributed.new_group asks."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=timeout)
        mine = group if rank in ranks else mine
    return mine


def _unravel(index: int, shape: list[int]) -> list[int]:
    out = []
    for s in reversed(shape):
        out.append(index % s)
        index //= s
    return out[::-1]

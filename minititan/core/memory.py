"""Memory: refuse a model that cannot fit before initialising it, and recognise running out.

A model far too big for the device would otherwise spend minutes initialising before the first
allocation fails. Its parameter count gives a floor on what each rank holds: the fp32 master
weights, their fp32 gradients and AdamW's two fp32 moments, 16 bytes a parameter, split at best over
every rank that shards or slices them (dp_shard x cp x tp x pp; dp_replicate only copies).
Activations and buffers come on top, so passing this check does not promise a fit; failing it
proves there is none.

CUDA's allocator raises torch.OutOfMemoryError; the CPU's raises a RuntimeError naming
DefaultCPUAllocator, and numpy a MemoryError: `is_out_of_memory` recognises all three.
"""
from __future__ import annotations

import os

import torch

from minititan.core import model
from minititan.core.config import AgreedError, Config

BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or numpy's MemoryError (the batch's indices)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_in_use(device: torch.device) -> tuple[int, int]:
    """(bytes in use, bytes in all) of the device's memory; the host's for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free, total
    total = host_memory_bytes()
    return total - os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total


def check_fits(cfg: Config, sizes: dict[str, int], device_type: str, capacity: int, ranks_sharing: int = 1) -> None:
    """Refuse (one line, with the numbers) when the parameters' floor exceeds a rank's share of
    `capacity` bytes (a GPU's memory, or the host's shared by `ranks_sharing` CPU ranks)."""
    params = model.num_params(cfg.model)
    shards = sizes["dp_shard"] * sizes["cp"] * sizes["tp"] * sizes["pp"]
    need = params * BYTES_PER_PARAM / shards
    have = capacity / ranks_sharing
    if need <= have:
        return
    on = (f"GPU memory ({capacity / 2**30:.1f} GiB)" if device_type == "cuda" else
          f"host memory ({capacity / 2**30:.1f} GiB" + (f" shared by {ranks_sharing} ranks)" if ranks_sharing > 1
                                                         else ")"))
    fix = ("shard it over more GPUs (parallelism.dp_shard, tp, pp) or train a smaller model" if device_type == "cuda"
           else "train a smaller model (model.dim, model.n_layers, model.vocab_size) or use GPUs")
    raise AgreedError(f"the model does not fit: its {params / 1e9:.2f} B parameters need at least "
                      f"{need / 2**30:.1f} GiB a rank ({BYTES_PER_PARAM} bytes each for weight, gradient and AdamW "
                      f"moments, over {shards} shard(s)), more than a rank's {have / 2**30:.1f} GiB of {on}: {fix}")


def check_device_fits(cfg: Config, sizes: dict[str, int], local_ranks: int, in_rank: bool) -> None:
    """check_fits for the device this process would train on: the host's memory shared by the
    `local_ranks` CPU ranks of this host, or this rank's GPU (in a rank only: a launcher leaves CUDA alone)."""
    use_cuda = cfg.training.device == "cuda" or (cfg.training.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        check_fits(cfg, sizes, "cpu", host_memory_bytes(), ranks_sharing=local_ranks)
    elif in_rank:
        index = int(os.environ.get("LOCAL_RANK", 0))
        if index < torch.cuda.device_count():
            check_fits(cfg, sizes, "cuda", torch.cuda.get_device_properties(index).total_memory)

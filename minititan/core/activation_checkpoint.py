"""How each block runs: plain, recomputed in backward (activation checkpointing), and/or compiled.

The model calls every attention and feed-forward unit through `ops.run_block(fn, *args)`; this
file builds that function from the config:
  mode = "none"       keep every activation for backward;
  mode = "full"       keep only each block's input, recompute the block in backward;
  mode = "selective"  with selective = "op": keep the outputs of matmuls and attention (the
                      expensive ops) and Float8's amaxes, and recompute only the cheap
                      element-wise ones (norms, SiLU, RoPE, casts); with selective = N (an
                      integer): checkpoint fully every N-th transformer block and keep
                      everything in the others.
compile wraps each block function with torch.compile (one compiled graph serves all layers,
since every layer's params reach the function under the same relative names).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minititan.core import mixed_precision  # noqa: F401  (defines torch.ops.minititan.master_linear)

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
    # the MoE experts' grouped GEMMs (bf16, and Float8's): their outputs are what the dense feed-forward's
    # mm outputs are, and recomputing them would add a third to the experts' FLOPs
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_grouped_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.minititan.master_linear.default,  # the compiled bf16 linear on an fp32 master (mixed_precision.py)
    # Float8's amaxes (a scalar, or one per row): kept, the recompute casts with them instead of
    # reading the weight and the activation once more to reduce them again. torchtitan's policy
    # keeps aten.max, its spelling of the same reduction, for the same reason.
    torch.ops.aten.amax.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def block_runner(mode: str, selective: str = "op", compile_blocks: bool = False, layers_per_forward: int = 1):
    """The `run_block(fn, *args)` for these settings. `layers_per_forward` = the blocks this rank
    runs in one forward, so "every N-th" restarts at each forward.

    Checkpointing goes inside the compiled function (compile(checkpoint(fn))), as torchtitan
    does: the compiler then sees the whole block and applies the save/recompute policy to the
    graph it partitions, instead of treating a compiled block as one opaque op."""
    every = int(selective) if mode == "selective" and selective != "op" else 0
    policy = {} if mode == "full" or every else {"context_fn": _selective_op_context}
    variants = {}
    calls = {"n": 0}

    def variant(fn, recompute: bool):
        if (fn, recompute) not in variants:
            f = functools.partial(_checkpointed, fn, policy) if recompute else fn
            variants[fn, recompute] = torch.compile(f) if compile_blocks else f
        return variants[fn, recompute]

    def run_block(fn, params, *args):
        recompute = mode != "none" and torch.is_grad_enabled()
        if recompute and every:  # attention + feed-forward are one block: both halves of every N-th layer
            calls["n"] += 1
            recompute = ((calls["n"] - 1) // 2) % layers_per_forward % every == 0
        if recompute:
            return variant(fn, True)(tuple(params), *params.values(), *args)
        return variant(fn, False)(params, *args)

    return run_block


def _checkpointed(fn, policy, names, *args):
    """fn(dict(zip(names, params)), *rest) under checkpoint. The unit's params go in as separate
    tensors, not inside a dict, so checkpoint does not keep them alive until backward: under
    FSDP they are then freed after the forward and re-gathered for the recompute."""
    n = len(names)

    def body(*a):
        return fn(dict(zip(names, a[:n])), *a[n:])

    return checkpoint(body, *args, use_reentrant=False, **policy)


def _selective_op_context():
    return create_selective_checkpoint_contexts(_save_matmuls)

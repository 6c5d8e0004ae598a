"""How each block runs: plain, recomputed in backward (activation checkpointing), and/or compiled.

The model calls every attention and feed-forward unit through `ops.run_block(fn, *args)`; this
file builds that function from the config:
  mode = "none"       keep every activation for backward;
  mode = "full"       keep only each block's input, recompute the block in backward;
  mode = "selective"  with selective = "op": keep the outputs of matmuls and attention (the
                      expensive ops) and recompute only the cheap element-wise ones (norms,
                      SiLU, RoPE, casts); with selective = N (an integer): checkpoint fully every
                      N-th transformer block and keep everything in the others.
compile wraps each block function with torch.compile (one compiled graph serves all layers,
since every layer's params reach the function under the same relative names).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def block_runner(mode: str, selective: str = "op", compile_blocks: bool = False, layers_per_forward: int = 1):
    """The `run_block(fn, *args)` for these settings. `layers_per_forward` = the blocks this rank
    runs in one forward, so "every N-th" restarts at each forward."""
    compiled = functools.cache(torch.compile) if compile_blocks else (lambda fn: fn)
    every = int(selective) if mode == "selective" and selective != "op" else 0
    calls = {"n": 0}

    def run_block(fn, *args):
        f = compiled(fn)
        if mode == "none" or not torch.is_grad_enabled():
            return f(*args)
        if mode == "full":
            return checkpoint(f, *args, use_reentrant=False)
        if every:  # count attention+ffn as one block: checkpoint both halves of every N-th layer
            calls["n"] += 1
            layer = ((calls["n"] - 1) // 2) % layers_per_forward
            return checkpoint(f, *args, use_reentrant=False) if layer % every == 0 else f(*args)
        return checkpoint(f, *args, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls))

    return run_block

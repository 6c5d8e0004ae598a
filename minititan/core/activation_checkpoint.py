"""How each block runs: plain, recomputed in backward (activation checkpointing), and/or compiled.

The model calls every attention and feed-forward unit through `ops.run_block(fn, *args)`; this
file builds that function from the config:
  mode = "none"       keep every activation for backward;
  mode = "full"       keep only each block's input, recompute the block in backward;
  mode = "selective"  with selective = "op": keep the outputs of matmuls and attention (the
                      expensive ops) and Float8's amaxes, and recompute the cheap
                      element-wise ones (norms, SiLU, RoPE, casts) and one matmul, the query
                      projection (see _selective_op_context); with selective = "attention":
                      keep only the attention's output (and its softmax statistics) and
                      recompute the rest of the block, as full does (see _save_attention);
                      with selective = N (an integer): checkpoint fully every N-th
                      transformer block and keep everything in the others.
compile wraps each block function with torch.compile (one compiled graph serves all layers,
since every layer's params reach the function under the same relative names). A block that breaks
dynamo's graph (a host read, an async collective, code under torch.compiler.disable: the layout
names them) cannot be compiled inside checkpoint, where dynamo would run it whole eagerly; under
full checkpointing it is checkpointed outside and compiled inside instead, in pieces.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minititan.core import mixed_precision  # noqa: F401  (defines torch.ops.minititan.master_linear)

# the ops a linear layer runs as: plain, with a bias, Float8, and the compiled bf16 linear on an fp32
# master (mixed_precision.py). The query projection is one of them (_selective_op_context).
_LINEARS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.minititan.master_linear.default,
}
# the attention kernels (each returns the output and the softmax statistics its backward reads)
_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_SAVE_OPS = _LINEARS | _ATTENTION | {
    torch.ops.aten.bmm.default,
    # the MoE experts' grouped GEMMs (bf16, and Float8's): their outputs are what the dense feed-forward's
    # mm outputs are, and recomputing them would add a third to the experts' FLOPs
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_grouped_mm.default,
    # Float8's amaxes (a scalar, or one per row): kept, the recompute casts with them instead of
    # reading the weight and the activation once more to reduce them again. torchtitan's policy
    # keeps aten.max, its spelling of the same reduction, for the same reason.
    torch.ops.aten.amax.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention(ctx, op, *args, **kwargs):
    """selective = "attention": full checkpointing but for the attention kernel's results. Its
    forward is the block's one cost that grows with the square of the sequence (the rest is linear
    in it), so at long context it is most of full AC's recompute, for one [tokens, dim] tensor per
    layer held; the projections feeding it are recomputed (its backward reads q, k and v)."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION else CheckpointPolicy.PREFER_RECOMPUTE


def block_runner(mode: str, selective: str = "op", compile_blocks: bool = False, layers_per_forward: int = 1,
                 graph_breaking: frozenset[str] = frozenset()):
    """The `run_block(fn, *args)` for these settings. `layers_per_forward` = the blocks this rank
    runs in one forward, so "every N-th" restarts at each forward. `graph_breaking`: the names of
    the block functions that break dynamo's graph in this layout.

    Checkpointing goes inside the compiled function (compile(checkpoint(fn))), as torchtitan
    does: the compiler then sees the whole block and applies the save/recompute policy to the
    graph it partitions, instead of treating a compiled block as one opaque op. The exception is
    a graph-breaking block under full checkpointing (see the module docstring)."""
    every = int(selective) if mode == "selective" and selective.isdigit() else 0
    by_op = mode == "selective" and selective == "op"
    keep_attention = mode == "selective" and selective == "attention"
    variants = {}
    calls = {"n": 0}

    def variant(fn, recompute: bool, names):
        if (fn, recompute) not in variants:
            variants[fn, recompute] = build(fn, recompute, names)
        return variants[fn, recompute]

    def build(fn, recompute: bool, names):
        if not recompute:
            return torch.compile(fn) if compile_blocks else fn
        policy = {}
        if by_op:  # the attention unit is the one holding the query projection (its first matmul)
            policy = {"context_fn": functools.partial(_selective_op_context, "attention.wq" in names)}
        elif keep_attention:
            policy = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_attention)}
        if compile_blocks and not policy and fn.__name__ in graph_breaking:
            # checkpoint outside, compile inside: dynamo compiles the pieces around the break. (Not
            # under a selective policy: torch's selective checkpointing cannot replay compiled
            # pieces, their ops do not reach its dispatch mode one by one.)
            return functools.partial(_checkpointed, torch.compile(fn), policy)
        checkpointed = functools.partial(_checkpointed, fn, policy)
        return torch.compile(checkpointed) if compile_blocks else checkpointed

    def run_block(fn, params, *args):
        recompute = mode != "none" and torch.is_grad_enabled()
        if recompute and every:  # attention + feed-forward are one block: both halves of every N-th layer
            calls["n"] += 1
            recompute = ((calls["n"] - 1) // 2) % layers_per_forward % every == 0
        if recompute:
            return variant(fn, True, params)(tuple(params), *params.values(), *args)
        return variant(fn, False, params)(params, *args)

    return run_block


def _checkpointed(fn, policy, names, *args):
    """fn(dict(zip(names, params)), *rest) under checkpoint. The unit's params go in as separate
    tensors, not inside a dict, so checkpoint does not keep them alive until backward: under
    FSDP they are then freed after the forward and re-gathered for the recompute."""
    n = len(names)

    def body(*a):
        return fn(dict(zip(names, a[:n])), *a[n:])

    return checkpoint(body, *args, use_reentrant=False, **policy)


def _selective_op_context(recompute_query: bool):
    """The selective-op policy for one checkpointed unit. In the attention unit the first matmul,
    the query projection, is recomputed too. Rebuilding a matmul output costs 2 * K FLOPs per
    element it would hold (K: the contracted dim), so the projections out of the model width
    (q, k, v, w1, w3) are the cheapest per byte; q gives back one [tokens, dim] tensor per layer
    (k and v are smaller under grouped-query attention, w1 and w3 several times larger and as
    many times the GEMM) for one more [tokens, dim] x [dim, dim] GEMM in backward: about the
    memory that keeps the 8B-width rows under torchtitan's (benchmarks/single_gpu.md weighs the
    trade). The forward and its recompute count their matmuls separately, so both passes pick
    the same one."""
    matmuls_seen = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if recompute_query and op in _LINEARS:
            matmuls_seen[ctx.is_recompute] += 1
            if matmuls_seen[ctx.is_recompute] == 1:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return _save_matmuls(ctx, op, *args, **kwargs)

    return create_selective_checkpoint_contexts(policy)

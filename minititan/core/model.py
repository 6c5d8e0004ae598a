"""Llama 3 as pure functions over a flat dict of parameters.

    params = init(cfg, seed)                       # {"layers.3.attention.wq": Tensor, ...}
    logits = forward(params, tokens, cfg)          # [batch, seq, vocab]
    loss   = loss_sum(params, tokens, labels, cfg) # summed token cross-entropy

There are no nn.Modules. Parallelism works on two seams, both explicit:
  * the param dict: a layout transforms it (shards it, slices it per rank) and supplies each
    *unit* of parameters through `ops.gather(params, unit)` right before the unit runs;
  * the `Ops` record: the few operations the forward calls (linear, attention, embedding,
    cross-entropy, the entry/exit of a tensor-parallel region, the wrapper around each block).
A layout swaps entries of `Ops`; the model code never changes. The model also declares how tensor
parallelism may split it (`tp_shard_dim`): the files of collectives/ know no parameter names.

Units are what FSDP shards and gathers as one: `tok_embeddings`, `layers.{i}.attention`
(attention_norm + wq wk wv wo), `layers.{i}.feed_forward` (ffn_norm + w1 w2 w3), and
`output` (norm + output). A unit's params reach its function under names relative to the
layer ("attention.wq"), so torch.compile sees one graph for every layer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from minititan.core import moe
from minititan.core.config import Model, head_dim, hidden_dim
from minititan.core.document_attention import document_mask, masked_attention

Params = dict[str, Tensor]


# ---------------------------------------------------------------- names, shapes, units


def param_shapes(cfg: Model) -> dict[str, tuple[int, ...]]:
    """Every parameter's full (unsharded) shape, in forward order."""
    shapes = {"tok_embeddings": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        shapes |= attention_shapes(cfg, i) | feed_forward_shapes(cfg, i)
    shapes |= {"norm": (cfg.dim,), "output": (cfg.vocab_size, cfg.dim)}
    return shapes


def attention_shapes(cfg: Model, i: int) -> dict[str, tuple[int, ...]]:
    """Attention unit i: Llama's, plus the q/k/v biases (qkv_bias, Qwen2) and the per-head q/k norms
    (qk_norm, Qwen3) where the config asks for them."""
    L, d, hd = f"layers.{i}.", cfg.dim, head_dim(cfg)
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {L + "attention_norm": (d,), L + "attention.wq": (q, d), L + "attention.wk": (kv, d),
              L + "attention.wv": (kv, d), L + "attention.wo": (d, q)}
    if cfg.qkv_bias:
        shapes |= {L + "attention.bq": (q,), L + "attention.bk": (kv,), L + "attention.bv": (kv,)}
    if cfg.qk_norm:
        shapes |= {L + "attention.q_norm": (hd,), L + "attention.k_norm": (hd,)}
    return shapes


def feed_forward_shapes(cfg: Model, i: int) -> dict[str, tuple[int, ...]]:
    return moe.moe_shapes(cfg, i) if moe.is_moe_layer(cfg, i) else dense_feed_forward_shapes(cfg, i)


def dense_feed_forward_shapes(cfg: Model, i: int) -> dict[str, tuple[int, ...]]:
    L, h = f"layers.{i}.", hidden_dim(cfg)
    return {L + "ffn_norm": (cfg.dim,), L + "feed_forward.w1": (h, cfg.dim),
            L + "feed_forward.w2": (cfg.dim, h), L + "feed_forward.w3": (h, cfg.dim)}


def unit_of(name: str) -> str:
    """The unit a parameter belongs to: layers.3.ffn_norm -> layers.3.feed_forward."""
    if name in ("norm", "output"):
        return "output"
    if not name.startswith("layers."):
        return name.split(".")[0]
    _, i, rest = name.split(".", 2)
    part = "attention" if rest.startswith("attention") else "feed_forward"
    return f"layers.{i}.{part}"


LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # the leaf names forward passes to ops.linear


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether forward multiplies `name` through ops.linear (the MoE experts, 3-D, go through a
    grouped GEMM; the router and the embedding through other ops)."""
    return len(shape) == 2 and name.rsplit(".", 1)[-1] in LINEAR_WEIGHTS


# The tensor-parallel plan, by the end of a name (full or unit-local): column-parallel weights keep
# a slice of their output features (dim 0), row-parallel ones of their input features (dim 1), the
# embedding and the head of the vocabulary (dim 0); the rest (norms, MoE layers) stays whole. The q/k/v
# biases (qkv_bias) split with their weights' rows; the per-head q/k norms (qk_norm) stay whole.
TP_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "attention.bq", "attention.bk", "attention.bv",
             "feed_forward.w1", "feed_forward.w3")
TP_ROW = ("attention.wo", "feed_forward.w2")
TP_VOCAB = ("tok_embeddings", "output")


def tp_shard_dim(name: str) -> int | None:
    """The dim tensor parallelism splits parameter `name` along (0 or 1), or None if it is replicated."""
    def matches(keys: tuple[str, ...]) -> bool:
        return any(name == key or name.endswith("." + key) for key in keys)
    if matches(TP_COLUMN + TP_VOCAB):
        return 0
    return 1 if matches(TP_ROW) else None


def units(cfg: Model) -> dict[str, list[str]]:
    """Unit name -> its parameter names, in the order the forward runs them."""
    out: dict[str, list[str]] = {}
    for name in param_shapes(cfg):
        out.setdefault(unit_of(name), []).append(name)
    return out


def local_name(name: str) -> str:
    """The name a unit's function sees: layers.3.attention.wq -> attention.wq."""
    return name.split(".", 2)[2] if name.startswith("layers.") else name


# ---------------------------------------------------------------- init


def init(cfg: Model, seed: int, device: str | torch.device = "cpu", dtype=torch.float32,
         names: list[str] | None = None) -> Params:
    """Full parameters, identical whatever the layout: each tensor has its own generator
    seeded by (seed, name), so a rank that builds only some names gets the same values.
    (Values are bitwise equal for the same device type; the CPU is the reference.)"""
    shapes = param_shapes(cfg)
    out = {}
    for name in names if names is not None else shapes:
        out[name] = init_param(cfg, name, shapes[name], seed, device, dtype)
    return out


def init_box(cfg: Model, seed: int, name: str, shape: tuple[int, ...], box: list[list[int]], device) -> Tensor:
    """The fp32 [start, stop) box (per dim) of one tensor's init (`shape`: its full shape): a rank's
    slice of it, built one full tensor at a time, so its values do not depend on the layout."""
    full = init_param(cfg, name, shape, seed, device, torch.float32)
    return full[tuple(slice(a, b) for a, b in box)].clone(memory_format=torch.contiguous_format)


def init_param(cfg: Model, name: str, shape, seed: int, device, dtype) -> Tensor:
    t = torch.empty(shape, device=device, dtype=torch.float32)
    if isinstance(t, FakeTensor):  # a dry run (minititan plan): shapes without storage, no values to draw
        return t.to(dtype)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm"):
        t.fill_(1.0)
    elif name == "tok_embeddings":
        t.normal_(0.0, 1.0, generator=gen)
    elif name == "output":
        std = cfg.dim ** -0.5
        torch.nn.init.trunc_normal_(t, 0.0, std, -3 * std, 3 * std, generator=gen)
    elif name.endswith(".bias") or leaf in ("expert_bias", "bq", "bk", "bv"):
        t.zero_()
    else:
        # depth-scaled init for the projections that write into the residual stream
        layer = int(name.split(".")[1]) if name.startswith("layers.") else 0
        std = 0.02 if leaf in ("wq", "wk", "wv", "w1", "router", "shared_gate") else 0.02 / math.sqrt(2 * (layer + 1))
        torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=gen)
    return t.to(dtype)


# ---------------------------------------------------------------- the swappable ops


def select_unit(params: Mapping[str, Tensor], unit: str, names: list[str]) -> Params:
    """The default gather: the unit's tensors, renamed relative to their layer."""
    return {local_name(n): params[n] for n in names}


_CUDA_ATTENTION_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask=None) -> Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]; kv heads are shared by hq/hkv queries.
    mask: a document mask (Ops.document_mask), or None for plain causal attention.
    On CUDA cuDNN's kernel goes first, the fastest on the 8B shapes (benchmarks/single_gpu.md);
    flash and memory-efficient stay as fallbacks. Those three take 16-bit
    inputs only (memory-efficient takes fp32 but not shared kv heads): fp32 goes the CPU's way."""
    if mask is not None:
        return masked_attention(q, k, v, mask)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        with sdpa_kernel(_CUDA_ATTENTION_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IGNORE_INDEX = -100  # a label that adds nothing to the loss, as in F.cross_entropy
LOSS_CHUNK_TOKENS = 2048


def cross_entropy_sum(h: Tensor, w_out: Tensor, labels: Tensor, linear=F.linear) -> Tensor:
    """Summed token cross-entropy of logits = h @ w_out.T, computed in fp32 without ever holding fp32
    logits for the whole batch. Compiled, inductor fuses the upcast into the log-softmax reduction;
    eager, CrossEntropyGradInForward works through chunks of tokens."""
    logits, labels = linear(h, w_out).flatten(0, -2), labels.flatten()
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropyGradInForward.apply(logits, labels)
    acc = torch.promote_types(logits.dtype, torch.float32)  # no backward (validation): just the chunks' losses
    return sum(F.cross_entropy(lg.to(acc), lb, ignore_index=IGNORE_INDEX, reduction="sum")
               for lg, lb in zip(logits.split(LOSS_CHUNK_TOKENS), labels.split(LOSS_CHUNK_TOKENS)))


class CrossEntropyGradInForward(torch.autograd.Function):
    """The gradient of a summed cross-entropy is softmax(logits) - one_hot(label), known as soon as the
    softmax is. So the forward computes it chunk by chunk (fp32 for one chunk of tokens at a time:
    1 GiB at 8B's 128K vocabulary, instead of three 4 GiB tensors for a 8192-token sequence) and keeps
    it in the logits' dtype; the backward only scales it. Eager, this moves about half the bytes of
    F.cross_entropy on upcast logits and needs no recompute."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        grad, total = torch.empty_like(logits), logits.new_zeros((), dtype=acc)
        for lo in range(0, labels.numel(), LOSS_CHUNK_TOKENS):
            rows = slice(lo, lo + LOSS_CHUNK_TOKENS)
            label, kept = labels[rows].clamp_min(0)[:, None], (labels[rows] != IGNORE_INDEX)[:, None]
            logp = F.log_softmax(logits[rows], dim=-1, dtype=acc)
            total -= logp.gather(1, label).mul_(kept).sum()
            probs = logp.exp_().scatter_add_(1, label, -kept.to(acc))  # softmax - one_hot(label)
            torch.mul(probs, kept, out=grad[rows])  # ignored tokens: no gradient
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        # Scaled in place: no second logits-sized buffer, one pass less over it. The graph runs
        # this node once (zero bubble's split re-enters only the weights' nodes); were it run
        # again, unpacking the saved tensor would raise (its version moved) rather than scale twice.
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(grad.dtype)), None


def identity(x: Tensor) -> Tensor:
    return x


def call(fn: Callable, *args):
    return fn(*args)


@dataclasses.dataclass
class Ops:
    """The operations a forward calls. A parallel layout replaces the ones it changes."""
    gather: Callable = None  # (params, unit) -> the unit's params, relative names      [FSDP]
    linear: Callable = F.linear  # (x, w) -> x @ w.T (w: its own dtype or an fp32 master) [bf16, Float8]
    attention: Callable = causal_attention  # (q, k, v[, mask=]) in [b, h, s, d]         [CP]
    document_mask: Callable = document_mask  # [b, s] document indices -> attention's mask [CP]
    embedding: Callable = F.embedding  # (tokens, weight)                                [TP]
    cross_entropy: Callable = cross_entropy_sum  # (h, w_out, labels, linear) -> sum    [TP]
    into_tp: Callable = identity  # before the column-parallel matmuls                   [TP/SP]
    out_of_tp: Callable = identity  # after the row-parallel matmuls                     [TP/SP]
    run_block: Callable = call  # (block_fn, *args): where compile / checkpointing wrap  [AC]
    sum_over_sequence: Callable = moe.whole_sequences  # (stats, seq_len): MoE's, over a sequence's ranks [CP/SP]
    moe: Callable = None  # (p, x, cfg, ops) -> y: the MoE layer (core/moe.py)            [EP]


def default_ops(cfg: Model) -> Ops:
    unit_names = units(cfg)
    ops = Ops(gather=lambda params, unit: select_unit(params, unit, unit_names[unit]))
    if cfg.name == "moe":
        ops.moe = moe.moe_feed_forward
    return ops


# ---------------------------------------------------------------- the network


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight. torch's fused kernel accumulates in fp32 whatever x's dtype; eager it is
    one kernel where the spelled-out formula is six (benchmarks/single_gpu.md, eager rows)."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def rope_frequencies(cfg: Model) -> Tensor:
    """Per-pair rotation speeds, with Llama 3's scaling of the low frequencies if enabled."""
    return _rope_frequencies(head_dim(cfg), cfg.rope_theta, _llama3_scaling(cfg)).clone()


def _llama3_scaling(cfg: Model) -> tuple[float, float, float, int] | None:
    """(factor, low_freq_factor, high_freq_factor, original context), or None: hashable, for the cache."""
    if not cfg.rope_scaling:
        return None
    return cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context


@functools.lru_cache
def _rope_frequencies(hd: int, theta: float, scaling: tuple[float, float, float, int] | None) -> Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if scaling:  # Llama 3: wavelengths longer than the pre-training context slow down by factor, short ones
        factor, low, high, old_len = scaling  # stay, and the band between blends the two (3.1: 8, 1, 4, 8192)
        wavelen = 2 * math.pi / freqs
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        mid = (1 - smooth) * freqs / factor + smooth * freqs
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        freqs = torch.where(is_mid, mid, scaled)
    return freqs


def rope_table(cfg: Model, positions: Tensor) -> Tensor:
    """(cos, sin) of each position's angle for each pair, [seq, head_dim/2, 2] fp32 ([batch, seq, ...]
    for per-row positions, as document masking gives): the real and imaginary parts of e^(i * angle),
    real so that a compiled block takes it without complex ops."""
    freqs = _rope_frequencies(head_dim(cfg), cfg.rope_theta, _llama3_scaling(cfg))
    angles = positions.to(torch.float64)[..., None] * freqs.to(positions.device, non_blocking=True)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of each head by the position's angle (Meta's layout):
    read each pair as the complex number x0 + i x1 and multiply, one kernel in eager mode.
    Compiled, the same product is spelled out in real arithmetic: inductor generates no code for
    complex tensors and leaves the multiply to eager kernels (see the profile in
    benchmarks/single_gpu.md); spelled out, it fuses into the kernels around it."""
    if torch.compiler.is_compiling():
        cos, sin = rope.unsqueeze(-3).unbind(-1)  # [s, 1, d/2] each (or [b, s, 1, d/2])
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rope).unsqueeze(-2)).flatten(-2).type_as(x)


def attention_block(p: Params, x: Tensor, rope, eps: float, head_dim: int, ops: Ops, mask=None) -> Tensor:
    """x + Attention(RMSNorm(x)). Head counts come from the weight shapes, so a
    tensor-parallel shard of wq/wk/wv (fewer heads) runs through the same code. The optional
    tensors say what else the model has: q/k/v biases (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3).
    mask: the document mask, None without document masking."""
    h = ops.into_tp(rms_norm(x, p["attention_norm"], eps))
    b, s = h.shape[0], h.shape[1]

    def heads(w: str, bias: str) -> Tensor:
        y = ops.linear(h, p[w])
        return (y + p[bias] if bias in p else y).view(b, s, -1, head_dim)

    q, k, v = (heads(f"attention.w{n}", f"attention.b{n}") for n in "qkv")
    if "attention.q_norm" in p:
        q, k = rms_norm(q, p["attention.q_norm"], eps), rms_norm(k, p["attention.k_norm"], eps)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o = ops.attention(q, k, v) if mask is None else ops.attention(q, k, v, mask=mask)
    o = o.transpose(1, 2).reshape(b, s, -1)
    return x + ops.out_of_tp(ops.linear(o, p["attention.wo"]))


def feed_forward_block(p: Params, x: Tensor, eps: float, ops: Ops) -> Tensor:
    """x + SwiGLU(RMSNorm(x)) = x + w2(silu(w1 h) * w3 h)."""
    h = ops.into_tp(rms_norm(x, p["ffn_norm"], eps))
    y = ops.linear(F.silu(ops.linear(h, p["feed_forward.w1"])) * ops.linear(h, p["feed_forward.w3"]),
                   p["feed_forward.w2"])
    return x + ops.out_of_tp(y)


def embed(params: Params, tokens: Tensor, ops: Ops) -> Tensor:
    return ops.embedding(tokens, ops.gather(params, "tok_embeddings")["tok_embeddings"])


def layer(params: Params, i: int, x: Tensor, rope, cfg: Model, ops: Ops, mask=None) -> Tensor:
    """One transformer block: its attention unit, then its feed-forward unit."""
    x = ops.run_block(attention_block, ops.gather(params, f"layers.{i}.attention"), x, rope, cfg.norm_eps,
                      head_dim(cfg), ops, mask)
    p = ops.gather(params, f"layers.{i}.feed_forward")
    if moe.is_moe_layer(cfg, i):
        return ops.run_block(ops.moe, p, x, cfg, ops)
    return ops.run_block(feed_forward_block, p, x, cfg.norm_eps, ops)


def final_hidden(params: Params, x: Tensor, cfg: Model, ops: Ops) -> tuple[Tensor, Tensor]:
    p = ops.gather(params, "output")
    return rms_norm(x, p["norm"], cfg.norm_eps), p["output"]


def hidden(params: Params, tokens: Tensor, cfg: Model, ops: Ops, positions: Tensor | None = None,
           layers: range | None = None, x: Tensor | None = None, documents: Tensor | None = None) -> Tensor:
    """Embedding (unless x is given) and the blocks in `layers` (default all). positions: [s] or
    per row [b, s] (default 0..s-1); documents: [b, s] each token's document in its row, for
    document masking (core/document_attention.py), or None."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
    rope = rope_table(cfg, positions)
    mask = None if documents is None else ops.document_mask(documents)
    if x is None:
        x = embed(params, tokens, ops)
    for i in layers if layers is not None else range(cfg.n_layers):
        x = layer(params, i, x, rope, cfg, ops, mask)
    return x


def forward(params: Params, tokens: Tensor, cfg: Model, ops: Ops | None = None,
            positions: Tensor | None = None, documents: Tensor | None = None) -> Tensor:
    """tokens [b, s] -> logits [b, s, vocab]."""
    ops = ops or default_ops(cfg)
    h, w_out = final_hidden(params, hidden(params, tokens, cfg, ops, positions, documents=documents), cfg, ops)
    return ops.linear(h, w_out)


def loss_sum(params: Params, tokens: Tensor, labels: Tensor, cfg: Model, ops: Ops | None = None,
             positions: Tensor | None = None, documents: Tensor | None = None) -> Tensor:
    """Summed next-token cross-entropy over every label (divide by the global token count)."""
    ops = ops or default_ops(cfg)
    h, w_out = final_hidden(params, hidden(params, tokens, cfg, ops, positions, documents=documents), cfg, ops)
    return ops.cross_entropy(h, w_out, labels, ops.linear)


# ---------------------------------------------------------------- accounting


def num_params(cfg: Model, exclude_embedding: bool = False) -> int:
    """param_shapes' total, counted per kind of layer rather than per layer, so that a config's
    n_layers may be any number (the memory check refuses a model too big before anything loops)."""
    def count(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes.values())

    n_moe = moe.n_moe_layers(cfg)
    layers = (cfg.n_layers * count(attention_shapes(cfg, 0)) + n_moe * (count(moe.moe_shapes(cfg, 0)) if n_moe else 0)
              + (cfg.n_layers - n_moe) * count(dense_feed_forward_shapes(cfg, 0)))
    embedding = 0 if exclude_embedding else cfg.vocab_size * cfg.dim
    return embedding + layers + cfg.dim + cfg.vocab_size * cfg.dim  # + the final norm and the output projection


def flops_per_token(cfg: Model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), the convention torchtitan uses:
        6 * N           N = parameters that do matmuls (all but the embedding table;
                        for MoE only the active experts: top_k of n_experts)
      + 12 * L * a * s  attention scores and values: 2 matmuls of 2*a*s flops per token per
                        layer, times 3 for the backward (a = n_heads * head_dim, Llama: dim). The causal mask means flash attention
                        does only half of this; we count it whole, as torchtitan does, so the
                        MFU figures of the two compare directly."""
    n = num_params(cfg, exclude_embedding=True)
    if cfg.name == "moe":
        n -= moe.inactive_expert_params(cfg)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * seq_len

"""Mixture of experts: a router sends each token to top_k of n_experts SwiGLU feed-forwards.

    y = x + shared(h) + sum_{e in topk(s + b)} w_e * expert_e(h),      h = RMSNorm(x)

* Router: scores s = softmax or sigmoid of h @ router.T (fp32). The top_k experts are chosen
  by s + b, where b is the expert bias of auxiliary-loss-free balancing (DeepSeek-V3): b only
  steers the choice, the weights w_e are the plain scores of the chosen experts (renormalized
  to sum to 1 with route_norm).
* Dropless: every (token, expert) pair is computed. The pairs are sorted by expert, so each
  expert's tokens are one contiguous block, and all experts run as one grouped GEMM
  (`torch._grouped_mm`) where the device and dtype allow it, else as a loop over the blocks.
  Expert parallelism (minititan/collectives/expert_parallel.py) swaps in its own `run_experts`
  that ships the blocks to the ranks owning the experts and back.
* Balancing, two ways, neither of which needs the forward to return anything but x:
    - aux loss (aux_loss_coef > 0): DeepSeek-V3's sequence-wise balance loss. Its gradient is
      injected in the backward of the layer output (`_SideGradients`), so it works unchanged
      under activation checkpointing, pipeline stages and torch.compile. When a sequence is
      split over ranks (context parallel, sequence parallel) its statistics are summed over
      those ranks first (`ops.sum_over_sequence`, the layer's one collective, which the layout
      supplies), so the loss is that of the whole sequence.
    - expert bias (bias_update_rate > 0): the bias is not learned by gradient descent. Its
      .grad slot instead receives the number of tokens routed to each expert, so the loads are
      summed over micro-batches and data-parallel ranks by the same reduction as every other
      gradient. `update_expert_bias` then nudges b toward balance and clears that .grad; call it
      after the gradient reduction and before clipping and the optimizer step.

Expert weights are stacked per layer: experts.w1/w3 [E, hidden, dim], experts.w2 [E, dim, hidden].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minititan.core import float8_grouped
from minititan.core.config import Model, hidden_dim

Experts = dict[str, Tensor]  # "w1", "w2", "w3": this rank's stacked expert weights


# ---------------------------------------------------------------- shapes and accounting


def is_moe_layer(cfg: Model, i: int) -> bool:
    """Every moe_frequency-th block after the first n_dense_layers (as Hugging Face's decoder_sparse_step)."""
    return cfg.name == "moe" and i >= cfg.n_dense_layers and i % cfg.moe_frequency == cfg.moe_frequency - 1


def n_moe_layers(cfg: Model) -> int:
    """How many blocks is_moe_layer picks: the i in [n_dense_layers, n_layers) with i % f == f - 1."""
    if cfg.name != "moe":
        return 0
    f = cfg.moe_frequency
    return max(0, cfg.n_layers // f - cfg.n_dense_layers // f)


def expert_hidden_dim(cfg: Model) -> int:
    return cfg.moe_hidden_dim or hidden_dim(cfg)


def moe_shapes(cfg: Model, i: int) -> dict[str, tuple[int, ...]]:
    """The parameters of MoE layer i, in forward order (all in unit layers.{i}.feed_forward)."""
    if not 1 <= cfg.top_k <= cfg.n_experts:
        raise ValueError(f"model.top_k={cfg.top_k} must be between 1 and model.n_experts={cfg.n_experts}")
    if cfg.moe_hidden_dim < 0 or cfg.n_shared_experts < 0:
        raise ValueError("model.moe_hidden_dim and model.n_shared_experts must be >= 0 (moe_hidden_dim 0 = the dense hidden dim)")
    L, d, h, E = f"layers.{i}.", cfg.dim, expert_hidden_dim(cfg), cfg.n_experts
    shapes = {L + "ffn_norm": (d,), L + "moe.router": (E, d), L + "moe.expert_bias": (E,),
              L + "moe.experts.w1": (E, h, d), L + "moe.experts.w2": (E, d, h), L + "moe.experts.w3": (E, h, d)}
    if cfg.n_shared_experts:
        hs = cfg.n_shared_experts * h  # the shared experts run as one wider SwiGLU
        shapes |= {L + "moe.shared.w1": (hs, d), L + "moe.shared.w2": (d, hs), L + "moe.shared.w3": (hs, d)}
        if cfg.shared_expert_gate:
            shapes[L + "moe.shared_gate"] = (1, d)
    return shapes


def inactive_expert_params(cfg: Model) -> int:
    """Expert weights a token does not use: (n_experts - top_k) experts in every MoE layer."""
    return n_moe_layers(cfg) * (cfg.n_experts - cfg.top_k) * 3 * expert_hidden_dim(cfg) * cfg.dim


# ---------------------------------------------------------------- routing


def route(h: Tensor, router: Tensor, expert_bias: Tensor, cfg: Model) -> tuple[Tensor, Tensor, Tensor]:
    """h [..., dim] -> scores [..., E] (fp32), chosen experts [..., k], their weights [..., k] (fp32)."""
    logits = F.linear(h, router).float()
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    chosen = torch.topk(scores + expert_bias.detach().float(), cfg.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(-1, chosen)
    if cfg.route_norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if cfg.route_scale != 1.0:
        weights = weights * cfg.route_scale
    return scores, chosen, weights


def tokens_per_expert(chosen: Tensor, n_experts: int) -> Tensor:
    """How many (token, expert) pairs go to each expert, [E] int64, on the device (no host sync:
    bincount would read the max back to the host on CUDA)."""
    flat = chosen.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def whole_sequences(stats: Tensor, seq_len: int) -> tuple[Tensor, int]:
    """ops.sum_over_sequence when every rank holds whole sequences: nothing to add."""
    return stats, seq_len


def sequence_balance_loss(scores: Tensor, chosen: Tensor, cfg: Model,
                          sum_over_sequence: Callable[[Tensor, int], tuple[Tensor, int]] = whole_sequences) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss, one value per sequence: [batch].

        sum_e f_e * P_e,   f_e = E / (k S) * (tokens of the sequence sent to e)   (1 when balanced)
                           P_e = mean over the sequence of the normalized score of e
    It is 1 when both the routing and the scores are uniform, and grows toward E / k as routing
    collapses onto k experts. It can dip below 1, e.g. when the expert bias sends tokens to experts
    the scores rate low. Per sequence (not per batch) so its value does not depend on how sequences
    are split over ranks.

    sum_over_sequence(stats, S) -> (stats, S) summed over the ranks that each hold an equal part of
    these sequences (cp, and tp under sequence parallel; ops.sum_over_sequence). The token counts
    and score sums are summed before they are divided by the whole S, so every rank of the group
    gets the whole sequence's loss."""
    b, s, E = scores.shape
    probs = scores / scores.sum(-1, keepdim=True)  # a no-op for softmax; sigmoid scores don't sum to 1
    counts = torch.zeros(b, E, device=scores.device).scatter_add_(
        1, chosen.reshape(b, -1), torch.ones(b, s * cfg.top_k, device=scores.device))
    stats = torch.stack([counts, probs.sum(1)])  # [2, b, E]: one collective for both
    stats, s = sum_over_sequence(stats, s)
    counts, score_sums = stats.unbind(0)
    f = counts * (E / (cfg.top_k * s))
    return (f * score_sums / s).sum(-1)


# ---------------------------------------------------------------- the experts


def swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, linear=F.linear) -> Tensor:
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def run_experts(x: Tensor, counts: Tensor, experts: Experts, fp8: bool = False) -> Tensor:
    """x [n, dim] sorted by expert, counts [E] rows per expert (device) -> [n, dim], in the same order:
    the experts of this rank (expert parallelism calls it on the rows it received)."""
    if experts["w1"].shape[0] != counts.numel():
        raise ValueError(f"{counts.numel()} experts routed here but the weights hold {experts['w1'].shape[0]}: "
                         "with expert parallelism give each rank its slice (expert_parallel.shard_experts)")
    return routed_experts(x, None, counts, experts, top_k=1, fp8=fp8)


def routed_experts(h: Tensor, order: Tensor | None, counts: Tensor, experts: Experts, top_k: int,
                   fp8: bool = False) -> Tensor:
    """Every (token, slot) pair through its expert: h [tokens, dim]; pair p = token * top_k + slot;
    order: the pairs sorted by expert (None: h's rows are the pairs, already sorted). Returns [pairs, dim]
    in pair order. Grouped GEMMs where they run (one gather in, one out), else the loop over experts."""
    if grouped_mm_ok(h, experts["w1"]):
        return run_experts_grouped(h, counts, experts, order, top_k, fp8)
    if order is None:
        return run_experts_loop(h, counts, experts)
    return sorted_to_pairs(run_experts_loop(pairs_sorted(h, order, top_k), counts, experts), order)


def pairs_sorted(h: Tensor, order: Tensor, top_k: int) -> Tensor:
    """The pairs' token rows in expert order: [pairs, dim]."""
    return _TokensToRows.apply(h, order // top_k, inverse_permutation(order), top_k)


def sorted_to_pairs(y_sorted: Tensor, order: Tensor) -> Tensor:
    """Rows in expert order back to pair order."""
    return _RowsToPairs.apply(y_sorted, inverse_permutation(order))


def inverse_permutation(order: Tensor) -> Tensor:
    """inverse[order[i]] = i: one scatter, where argsort would sort again."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def run_experts_grouped(h: Tensor, counts: Tensor, experts: Experts, order: Tensor | None = None, top_k: int = 1,
                        fp8: bool = False, align: int = 16) -> Tensor:
    """All experts in three grouped GEMMs, with no host sync, the pairs gathered straight from h into
    the GEMMs' buffer and straight back to pair order (routed_experts' arguments and result).

    The CUDA kernels load each expert's block of rows with TMA, which needs 16-byte aligned offsets:
    in the weight-gradient GEMM the rows are the contracted dim. So every block starts at a multiple of
    `align` rows, an expert without tokens still gets `align` rows (no empty groups), and the last block
    runs to the end of the buffer, whose size (pairs + E * align) is known without reading counts.
    The gap rows read token 0: their outputs are never read, so their gradient is zero, and zero
    rows of the output gradient add nothing to the weight gradients or to token 0's."""
    n, n_experts = (h.shape[0] if order is None else order.numel()), counts.numel()
    padded = ((counts + align - 1) // align * align).clamp_min(align)
    padded_end = padded.cumsum(0)
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=h.device), counts, output_size=n)
    row_in_block = torch.arange(n, device=h.device) - (counts.cumsum(0) - counts)[expert_of_row]
    dest = (padded_end - padded)[expert_of_row] + row_in_block  # each sorted pair's row in the buffer
    rows = n + n_experts * align
    source = torch.arange(n, device=h.device) if order is None else order // top_k
    token_of_row = torch.zeros(rows, dtype=torch.int64, device=h.device).index_copy_(0, dest, source)
    offs = padded_end.to(torch.int32)
    offs[-1] = rows

    def mm(a: Tensor, w: Tensor) -> Tensor:  # per block: a @ w[e].T, like F.linear
        if fp8 and _float8_grouped_supported(a.device.type):
            return float8_grouped.grouped_mm_fp8(a, w, offs)
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    row_of_pair = dest if order is None else torch.empty_like(dest).index_copy_(0, order, dest)
    x = _TokensToRows.apply(h, token_of_row, row_of_pair, top_k)
    y = mm(F.silu(mm(x, experts["w1"])) * mm(x, experts["w3"]), experts["w2"])
    return _RowsToPairs.apply(y, row_of_pair)


class _TokensToRows(torch.autograd.Function):
    """rows[r] = h[token_of_row[r]]: each token's row copied to its k pairs' rows of the buffer (and
    any token's to the gap rows). Backward: a token's gradient is the sum of its k pairs' rows,
    gathered in pair order and summed (no sort, no atomics; the gap rows' gradient is zero by
    construction and left out). Plain indexing would scatter-add with a sort of the indices."""

    @staticmethod
    def forward(ctx, h, token_of_row, row_of_pair, top_k):
        ctx.save_for_backward(row_of_pair)
        ctx.top_k = top_k
        return h[token_of_row]

    @staticmethod
    def backward(ctx, grad):
        (row_of_pair,) = ctx.saved_tensors
        return grad[row_of_pair].unflatten(0, (-1, ctx.top_k)).sum(1), None, None, None


class _RowsToPairs(torch.autograd.Function):
    """pairs[p] = rows[row_of_pair[p]], a one-to-one pick of rows. Backward: each row's gradient
    gathered from its pair, and zero for the gap rows (which no pair picks). Indexing's backward
    would scatter-add after a sort; a scatter into zeros would write the whole buffer twice."""

    @staticmethod
    def forward(ctx, rows, row_of_pair):
        ctx.save_for_backward(row_of_pair)
        ctx.n_rows = rows.shape[0]
        return rows[row_of_pair]

    @staticmethod
    def backward(ctx, grad):
        (row_of_pair,) = ctx.saved_tensors
        pairs = torch.arange(row_of_pair.numel(), device=grad.device)
        pair_of_row = torch.full((ctx.n_rows,), -1, device=grad.device).index_copy_(0, row_of_pair, pairs)
        gap = (pair_of_row < 0)[:, None]
        return grad[pair_of_row.clamp_min(0)].masked_fill_(gap, 0), None


def run_experts_loop(x: Tensor, counts: Tensor, experts: Experts) -> Tensor:
    """The exact reference: one SwiGLU per expert block. Reads counts on the host (one sync)."""
    blocks = torch.split(x, counts.tolist())
    w1, w2, w3 = experts["w1"], experts["w2"], experts["w3"]
    return torch.cat([swiglu(blk, w1[e], w2[e], w3[e]) for e, blk in enumerate(blocks)])


def grouped_mm_ok(x: Tensor, w1: Tensor) -> bool:
    """torch._grouped_mm runs bf16 on CUDA sm90+ (offsets int32, row strides 16-byte aligned: we
    ask for dim and hidden multiples of 16), and in eager mode on the CPU in recent torch (2.13
    runs fp32 and bf16 exactly). Elsewhere (fp32 on CUDA, older GPUs, CPU under compile) the loop."""
    if x.dtype != w1.dtype or x.shape[-1] % 16 or w1.shape[1] % 16:
        return False
    if not x.is_cuda and torch.compiler.is_compiling():
        return False  # the compile-time shape check accepts bf16 only
    return _grouped_mm_supported("cuda" if x.is_cuda else x.device.type, x.dtype)  # is_cuda: a dry run's fakes answer it


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing, never traces into it
def _grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    if device_type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)
    return device_type == "cpu" and _cpu_grouped_mm_runs(dtype)


@torch.compiler.assume_constant_result
def _float8_grouped_supported(device_type: str) -> bool:
    """torch._scaled_grouped_mm: CUDA sm90+ (Hopper) only; elsewhere the experts stay in bf16."""
    return (device_type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability() >= (9, 0))


def _cpu_grouped_mm_runs(dtype: torch.dtype) -> bool:
    return _CPU_GROUPED_MM.get(dtype, False)


def _try_cpu_grouped_mm(dtype: torch.dtype) -> bool:
    """Older CPU builds have no kernel: try a tiny one. At import, not on first use: a first use inside
    selective activation checkpointing would record the probe's GEMM in the forward and not in the
    recompute, and hand its output to the wrong op."""
    try:
        a, w = torch.ones(4, 16, dtype=dtype), torch.ones(2, 16, 16, dtype=dtype)
        out = torch._grouped_mm(a, w, offs=torch.tensor([1, 4], dtype=torch.int32))
        return bool((out == 16).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_CPU_GROUPED_MM = {dtype: _try_cpu_grouped_mm(dtype) for dtype in (torch.float32, torch.bfloat16)}


# ---------------------------------------------------------------- the layer


def moe_feed_forward(p: dict[str, Tensor], x: Tensor, cfg: Model, ops, *,
                     run_experts: Callable[[Tensor, Tensor, Experts], Tensor] | None = None,
                     aux_loss_scale: float = 1.0, balance_log: Tensor | None = None, fp8: bool = False) -> Tensor:
    """x + MoE(RMSNorm(x)), x [batch, seq, dim]; p has the layer-relative names (moe.router, ...).

    run_experts(x_sorted, counts, experts): None when this rank holds every expert (the pairs are
      gathered from the tokens straight into the grouped GEMMs, routed_experts); expert parallelism
      passes its own, which gets the pairs' rows sorted by expert and returns their outputs in that order.
    aux_loss_scale: what the trainer multiplies the summed loss by before backward (1/global
      label tokens if it backpropagates the mean, 1 if it backpropagates loss_sum). The aux
      loss is counted like loss_sum, as coef * seq_len per sequence, so after that division it
      is coef * (mean over sequences of the balance loss) per MoE layer.
    balance_log: if given, a [2] fp32 running (sum, count) on the device: each call adds its mean
      balance loss and 1 (log_mean), for the metrics' mean. Eager activation checkpointing adds
      again in the recompute, which leaves the mean unchanged.
    ops.sum_over_sequence sums the balance statistics over the ranks holding the other parts of
      x's sequences (cp, and tp under sequence parallel); every token is routed where it is (see
      sequence_balance_loss). Each rank counts the aux loss with its own seq len, so the group's
      terms add up to coef * S per sequence.
    fp8: the routed experts' grouped GEMMs in Float8 where the device has the kernel (float8_grouped)."""
    b, s, d = x.shape
    h = F.rms_norm(x, (d,), p["ffn_norm"].to(x.dtype), cfg.norm_eps)  # as the dense blocks' (model.rms_norm)
    h_flat = h.reshape(b * s, d)
    scores, chosen, weights = route(h, p["moe.router"], p["moe.expert_bias"], cfg)
    out = torch.zeros((), device=x.device)
    if cfg.n_shared_experts:  # first: under ep the GPU runs it while the host waits for the split sizes
        out = swiglu(h_flat, p["moe.shared.w1"], p["moe.shared.w2"], p["moe.shared.w3"], ops.linear).float()
        if "moe.shared_gate" in p:  # Qwen2-MoE: a learned per-token gate on the shared experts
            out = out * torch.sigmoid(F.linear(h_flat, p["moe.shared_gate"]).float())

    # sort the (token, slot) pairs by expert so every expert's rows are one contiguous block
    flat_chosen = chosen.flatten()
    order = flat_chosen.argsort(stable=True)
    counts = tokens_per_expert(flat_chosen, cfg.n_experts)
    experts = {w: p[f"moe.experts.{w}"] for w in ("w1", "w2", "w3")}
    if run_experts is None:
        y_pairs = routed_experts(h_flat, order, counts, experts, cfg.top_k, fp8)
    else:
        y_pairs = sorted_to_pairs(run_experts(pairs_sorted(h_flat, order, cfg.top_k), counts, experts), order)

    # the weighted sum over each token's k experts, in fp32 (one fused kernel under compile)
    out = out + (y_pairs.view(b * s, cfg.top_k, d).float() * weights.reshape(b * s, cfg.top_k, 1)).sum(1)
    out = out.view(b, s, d).type_as(x)

    aux_sum = None
    if cfg.aux_loss_coef > 0 or balance_log is not None:
        needs_grad = cfg.aux_loss_coef > 0  # logging only: no backward through the group's sum
        balance = sequence_balance_loss(scores if needs_grad else scores.detach(), chosen, cfg, ops.sum_over_sequence)
        if balance_log is not None:
            log_mean(balance_log, balance.mean())
        if needs_grad:
            aux_sum = cfg.aux_loss_coef * s * balance.sum()
    out = _SideGradients.apply(out, p["moe.expert_bias"], counts, aux_sum, aux_loss_scale)
    return x + out


def log_mean(log: Tensor, value: Tensor) -> None:
    """Add (value, 1) to a [2] running (sum, count) on the device; the metrics divide once a step.
    In place, not a list append: inside a compiled, checkpointed block dynamo keeps an in-place add
    in its graph, whereas a growing Python list makes it guard on the list's length (a recompile for
    every call) and, inside checkpoint, give up on the whole block (it then runs eagerly). Two adds
    into views of the log: no tensor made per call."""
    log[0].add_(value.detach())
    log[1].add_(1)


class _SideGradients(torch.autograd.Function):
    """Identity on the layer output. Its backward also gives
      * the expert bias a "gradient" equal to the tokens routed to each expert (its load), and
      * the aux loss its gradient d(objective)/d(aux_sum) = aux_loss_scale,
    so both travel with the ordinary backward wherever the output goes."""

    @staticmethod
    def forward(ctx, out, expert_bias, counts, aux_sum, aux_loss_scale):
        ctx.save_for_backward(counts)
        ctx.bias_dtype, ctx.aux_loss_scale = expert_bias.dtype, aux_loss_scale
        ctx.has_aux = aux_sum is not None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (counts,) = ctx.saved_tensors
        aux_grad = grad.new_full((), ctx.aux_loss_scale, dtype=torch.float32) if ctx.has_aux else None
        return grad, counts.to(ctx.bias_dtype), None, aux_grad, None


# ---------------------------------------------------------------- balancing and metrics


def is_expert_bias(name: str) -> bool:
    return name.endswith("moe.expert_bias")


@torch.no_grad()
def update_expert_bias(params: dict[str, Tensor], rate: float) -> Tensor:
    """Auxiliary-loss-free balancing, once per optimizer step, after the gradient reduction and
    before clipping / optimizer.step(). Each expert_bias[e] moves by `rate` toward balance:
    up if expert e got fewer tokens than the mean, down if more (centered so the bias does not
    drift). Reads the loads from expert_bias.grad and clears it, so neither the grad norm nor
    the optimizer ever sees them. Needs the full [E] bias tensors (replicated, not sharded).
    Returns the loads [n_moe_layers, E] (tokens per expert this step; on the device)."""
    loads = []
    for name in sorted((n for n in params if is_expert_bias(n)), key=_layer_index):
        bias = params[name]
        load = bias.grad.float() if bias.grad is not None else torch.zeros_like(bias, dtype=torch.float32)
        if rate:
            step = rate * torch.sign(load.mean() - load)
            bias += (step - step.mean()).to(bias.dtype)
        bias.grad = None
        loads.append(load)
    return torch.stack(loads) if loads else torch.zeros(0, 0)


def expert_bias_layers(params: dict[str, Tensor]) -> list[int]:
    """The layer index of each row of update_expert_bias's loads: this rank's MoE layers, in order."""
    return sorted(_layer_index(n) for n in params if is_expert_bias(n))


def load_spread(loads: Tensor) -> tuple[Tensor, Tensor]:
    """loads [layers, E] -> per layer, the busiest expert's load over the mean and the idlest one's
    (1 and 1 when perfectly balanced; a min of 0 is an expert that got no token)."""
    mean = loads.mean(-1).clamp_min(1e-9)
    return loads.amax(-1) / mean, loads.amin(-1) / mean


def _layer_index(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("layers.") else -1

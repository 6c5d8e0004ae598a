import contextlib
import dataclasses
import functools
import re
from pathlib import Path

import pytest
from msgspec.structs import replace
import torch
import torch.distributed as dist

from minititan.collectives import expert_parallel as ep_lib
from minititan.collectives.mesh import Mesh
from minititan.core import model, moe
from minititan.core.data import shakespeare_text
from minititan.core.config import Model, load_config
from minititan.layout import moe as layout_moe
from tests.distributed import run_ranks

CFG = Model(name="moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64,
            n_experts=8, top_k=2, moe_hidden_dim=64, n_shared_experts=1, aux_loss_coef=0.01)
LAYER = "layers.0."


def layer_params(cfg: Model, seed: int = 0) -> dict[str, torch.Tensor]:
    """MoE layer 0's params under layer-relative names, with a router and bias that matter."""
    full = model.init(cfg, seed)
    p = {model.local_name(n): t for n, t in full.items() if n.startswith(LAYER) and model.unit_of(n).endswith("feed_forward")}
    gen = torch.Generator().manual_seed(seed + 1)
    p["moe.router"] = torch.randn(p["moe.router"].shape, generator=gen)
    p["moe.expert_bias"] = 0.1 * torch.randn(p["moe.expert_bias"].shape, generator=gen)
    return {n: t.requires_grad_() for n, t in p.items()}


def per_token_reference(p, x, cfg: Model) -> torch.Tensor:
    """The MoE layer, one token at a time, straight from its definition."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            h = model.rms_norm(x[b, s], p["ffn_norm"], cfg.norm_eps)
            logits = p["moe.router"] @ h
            scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
            chosen = torch.topk(scores + p["moe.expert_bias"].detach(), cfg.top_k).indices
            weights = scores[chosen] / (scores[chosen].sum() if cfg.route_norm else 1.0)
            y = sum(w * moe.swiglu(h, p["moe.experts.w1"][e], p["moe.experts.w2"][e], p["moe.experts.w3"][e])
                    for w, e in zip(weights, chosen.tolist()))
            if cfg.n_shared_experts:
                y = y + moe.swiglu(h, p["moe.shared.w1"], p["moe.shared.w2"], p["moe.shared.w3"])
            out[b, s] = x[b, s] + y
    return out


def grads_of(fn, p, x, seed=0):
    """fn's output and the grads of <output, fixed random tensor> w.r.t. x and every param."""
    x = x.detach().clone().requires_grad_()
    for t in p.values():
        t.grad = None
    y = fn(p, x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)))
    return y.detach(), x.grad, {n: t.grad for n, t in p.items() if t.grad is not None}


def assert_close(a, b, rtol=1e-5, what=""):
    err = (a - b).norm() / b.norm().clamp_min(1e-12)
    assert err < rtol, f"{what}: rel diff {err:.2e}"


@pytest.mark.parametrize("variant", [dict(score_func="softmax", route_norm=False, n_shared_experts=0),
                                     dict(score_func="sigmoid", route_norm=True, n_shared_experts=1)])
def test_layer_matches_per_token_reference(variant):
    cfg = replace(CFG, aux_loss_coef=0.0, **variant)
    p, x = layer_params(cfg), torch.randn(2, 8, cfg.dim)
    ops = model.default_ops(cfg)
    # the routed pairs gathered straight into the grouped GEMMs (None, the default), and the sorted-rows
    # interface expert parallelism uses, with either kernel
    for run in (None, moe.run_experts_loop, moe.run_experts_grouped):
        layer = functools.partial(moe.moe_feed_forward, cfg=cfg, ops=ops, run_experts=run)
        y, gx, g = grads_of(lambda p, x: layer(p, x), p, x)
        y_ref, gx_ref, g_ref = grads_of(lambda p, x: per_token_reference(p, x, cfg), p, x)
        assert_close(y, y_ref, what="output")
        assert_close(gx, gx_ref, what="input grad")
        for n in g_ref:
            assert_close(g[n], g_ref[n], what=n)
        # the bias gets no gradient but the tokens routed to each expert: its load
        assert torch.equal(g["moe.expert_bias"].sum(), torch.tensor(2 * 8 * cfg.top_k, dtype=torch.float32))


def test_grouped_mm_matches_loop_with_empty_experts():
    experts = {w: torch.randn(4, 32, 16) if w != "w2" else torch.randn(4, 16, 32) for w in ("w1", "w2", "w3")}
    experts = {n: t.requires_grad_() for n, t in experts.items()}
    counts = torch.tensor([5, 0, 11, 0])
    x = torch.randn(16, 16)
    assert moe.grouped_mm_ok(x, experts["w1"]), "torch 2.13 runs _grouped_mm on the CPU in fp32"
    y, gx, g = grads_of(lambda p, x: moe.run_experts_grouped(x, counts, p), experts, x)
    y_ref, gx_ref, g_ref = grads_of(lambda p, x: moe.run_experts_loop(x, counts, p), experts, x)
    assert_close(y, y_ref, 1e-6, "output")
    assert_close(gx, gx_ref, 1e-6, "input grad")
    for n in g_ref:
        assert_close(g[n], g_ref[n], 1e-6, n)
    assert not moe.grouped_mm_ok(torch.randn(4, 24), torch.randn(2, 32, 24)), "dims must be multiples of 16"


def test_routed_experts_gather_pairs_from_tokens():
    """The grouped path reads each (token, slot) pair's row from the tokens and returns pair order:
    the same outputs and gradients as sorting the rows first and running the loop, with an expert
    that gets no pair and blocks that are not multiples of the alignment."""
    gen = torch.Generator().manual_seed(0)
    experts = {w: (torch.randn(4, 32, 16, generator=gen) if w != "w2" else torch.randn(4, 16, 32, generator=gen))
               for w in ("w1", "w2", "w3")}
    experts = {n: t.requires_grad_() for n, t in experts.items()}
    chosen = torch.tensor([[0, 2], [3, 0], [2, 0], [0, 3], [3, 2]]).flatten()  # 5 tokens, top 2; expert 1 idle
    order, counts = chosen.argsort(stable=True), moe.tokens_per_expert(chosen, 4)
    h = torch.randn(5, 16, generator=gen)

    def grouped(p, h):
        return moe.routed_experts(h, order, counts, p, top_k=2)

    def sorted_loop(p, h):
        return moe.run_experts_loop(h[order // 2], counts, p)[moe.inverse_permutation(order)]

    y, gh, g = grads_of(grouped, experts, h)
    y_ref, gh_ref, g_ref = grads_of(sorted_loop, experts, h)
    assert_close(y, y_ref, 1e-6, "output")
    assert_close(gh, gh_ref, 1e-6, "token grad")
    for n in g_ref:
        assert_close(g[n], g_ref[n], 1e-6, n)
    assert torch.equal(moe.inverse_permutation(order), order.argsort())


def test_aux_loss_gradient_is_injected():
    """The layer's backward adds aux_loss_scale * d(aux_sum): the same router gradient as adding
    coef * seq_len * (balance loss of each sequence) to the objective by hand."""
    gen = torch.Generator().manual_seed(3)
    p, x = layer_params(CFG), torch.randn(2, 8, CFG.dim, generator=gen)
    grad_out, scale = torch.randn(2, 8, CFG.dim, generator=gen), 0.25
    y = moe.moe_feed_forward(p, x, CFG, model.default_ops(CFG), aux_loss_scale=scale)
    y.backward(grad_out)
    router_grad = p["moe.router"].grad
    p["moe.router"].grad = None

    no_aux = replace(CFG, aux_loss_coef=0.0)
    y = moe.moe_feed_forward(p, x, no_aux, model.default_ops(no_aux))
    h = model.rms_norm(x, p["ffn_norm"], CFG.norm_eps)
    scores, chosen, _ = moe.route(h, p["moe.router"], p["moe.expert_bias"], CFG)
    aux_sum = CFG.aux_loss_coef * x.shape[1] * moe.sequence_balance_loss(scores, chosen, CFG).sum()
    ((y * grad_out).sum() + scale * aux_sum).backward()
    assert_close(router_grad, p["moe.router"].grad, what="router grad with aux loss")

    log = torch.zeros(2)
    moe.moe_feed_forward(p, x, CFG, model.default_ops(CFG), balance_log=log)
    balance = moe.sequence_balance_loss(scores, chosen, CFG)
    assert log[1] == 1 and torch.equal(log[0], balance.detach().mean())
    assert 0 < log[0] <= CFG.n_experts / CFG.top_k


def _sequence_part_rank(rank, world, cfg, p, x, grad_out):
    """Every rank holds its contiguous part of every sequence (like cp or sequence parallel) and
    sums the balance statistics over the world; returns its output, input grad, summed param grads
    and logged balance loss."""
    part = slice(rank * x.shape[1] // world, (rank + 1) * x.shape[1] // world)
    p = {n: t.detach().clone().requires_grad_() for n, t in p.items()}
    x = x[:, part].clone().requires_grad_()
    log = torch.zeros(2)
    ops = dataclasses.replace(model.default_ops(cfg), sum_over_sequence=functools.partial(
        layout_moe.sum_over_sequence, group=dist.group.WORLD))
    y = moe.moe_feed_forward(p, x, cfg, ops, aux_loss_scale=0.25, balance_log=log)
    y.backward(grad_out[:, part])
    grads = {n: t.grad for n, t in p.items()}
    for g in grads.values():
        dist.all_reduce(g)  # each rank routed its own tokens: the grads and loads are partial sums
    return y.detach(), x.grad, grads, log[0]


def test_balance_loss_of_split_sequences_is_the_whole_sequence_one():
    """The aux loss (large here, so a wrong gradient factor shows) and the logged balance loss
    with each sequence split over 2 ranks equal those of the whole sequences in one process."""
    cfg = replace(CFG, aux_loss_coef=1.0)
    p, x, grad_out = layer_params(cfg), torch.randn(2, 8, cfg.dim), torch.randn(2, 8, cfg.dim)
    x_ref = x.clone().requires_grad_()
    log = torch.zeros(2)
    y_ref = moe.moe_feed_forward(p, x_ref, cfg, model.default_ops(cfg), aux_loss_scale=0.25, balance_log=log)
    y_ref.backward(grad_out)
    for rank, (y, gx, grads, balance) in enumerate(run_ranks(2, _sequence_part_rank, cfg, p, x, grad_out)):
        part = slice(rank * 4, (rank + 1) * 4)
        assert_close(y, y_ref.detach()[:, part], what="output")
        assert_close(gx, x_ref.grad[:, part], what="input grad")
        for n, t in p.items():
            assert_close(grads[n], t.grad, what=n)
        assert_close(balance, log[0], what="logged balance loss")


def test_model_runs_and_is_causal():
    params = model.init(CFG, 0)
    x = torch.randint(0, 256, (1, 24))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 256, (12,))
    a, b = model.forward(params, x, CFG), model.forward(params, y, CFG)
    assert a.shape == (1, 24, 256)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])
    dense = model.num_params(CFG, exclude_embedding=True) - moe.inactive_expert_params(CFG)
    assert model.flops_per_token(CFG, 32) == 6 * dense + 12 * 2 * 64 * 32
    assert moe.inactive_expert_params(CFG) == 2 * (8 - 2) * 3 * 64 * 64


SIZES = {"moe_4b": (4.15e9, 1.66e9), "mixtral_8x7b": (46.7e9, 12.9e9), "qwen3_30b_a3b": (30.5e9, 3.35e9),
         "qwen1_5_moe_a2_7b": (14.3e9, 2.7e9), "deepseek_v3_16b": (15.9e9, 2.85e9)}  # total, active: published


@pytest.mark.parametrize("name", ["moe_debug", "deepseek_v3_small", *SIZES])
def test_configs_load(name):
    cfg = load_config(str(Path(__file__).parent.parent / "configs" / f"{name}.toml")).model
    total = model.num_params(cfg)
    active = total - moe.inactive_expert_params(cfg)
    if name in SIZES:
        want_total, want_active = SIZES[name]
        assert abs(total / want_total - 1) < 0.01 and abs(active / want_active - 1) < 0.01, (total, active)


def test_update_expert_bias():
    params = {"layers.1.moe.expert_bias": torch.zeros(4, requires_grad=True), "layers.1.ffn_norm": torch.ones(4)}
    params["layers.1.moe.expert_bias"].grad = torch.tensor([10.0, 2.0, 2.0, 2.0])
    loads = moe.update_expert_bias(params, 0.5)
    assert torch.equal(loads, torch.tensor([[10.0, 2.0, 2.0, 2.0]]))
    assert torch.equal(params["layers.1.moe.expert_bias"].detach(), torch.tensor([-0.75, 0.25, 0.25, 0.25]))
    assert params["layers.1.moe.expert_bias"].grad is None  # so clipping and the optimizer never see it
    busiest, idlest = moe.load_spread(torch.cat([loads, torch.tensor([[4.0, 4.0, 0.0, 0.0]])]))
    assert busiest.tolist() == [10 / 4, 2.0] and idlest.tolist() == [2 / 4, 0.0]


def test_bias_update_balances_load():
    """Auxiliary-loss-free balancing on a short byte-level Shakespeare run: without the bias
    update the router collapses onto a few experts; with it, over the last 50 steps every
    layer's busiest expert gets at most 1.3x the mean load."""
    cfg = replace(CFG, dim=32, n_heads=2, n_kv_heads=1, moe_hidden_dim=32, n_shared_experts=0,
                  aux_loss_coef=0.0, max_seq_len=32)
    text = shakespeare_text().encode()[:200_000]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        worst = {rate: _train_max_over_mean(cfg, data, rate, steps=200) for rate in (0.0, 0.01)}
    finally:
        torch.set_num_threads(threads)
    assert worst[0.01] <= 1.3, worst
    assert worst[0.0] > 2.0, worst


def _train_max_over_mean(cfg, data, rate, steps):
    params = {n: t.requires_grad_() for n, t in model.init(cfg, 0).items()}
    opt = torch.optim.AdamW([t for n, t in params.items() if not moe.is_expert_bias(n)], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    recent = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=gen)
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model.loss_sum(params, batch[:, :-1], batch[:, 1:], cfg) / batch[:, 1:].numel()
        loss.backward()
        loads = moe.update_expert_bias(params, rate)
        opt.step()
        opt.zero_grad()
        if step >= steps - 50:
            recent.append(loads)
    recent = torch.stack(recent).sum(0)  # tokens per expert over the last 50 steps, per layer
    return (recent.amax(-1) / recent.mean(-1)).max().item()


# ---------------------------------------------------------------- expert parallel


def _ep_rank(rank, world, cfg, tokens):
    """Every rank: its own sequences, its experts; returns its loss and grads for each ep degree."""
    full = model.init(cfg, 0)
    mesh = Mesh({"dp_shard": world}, rank)
    out = {}
    for ep, capacity_factor in ((2, 0.0), (4, 0.0), (2, 2.0), (4, 4.0)):  # exact; capped at a drop-free capacity
        ep_group, expert_dp_group = ep_lib.ep_groups(mesh, ep)
        ep_rank = dist.get_rank(ep_group)
        params = {n: t.detach().clone().requires_grad_() for n, t in ep_lib.shard_experts(full, ep_rank, ep).items()}
        ops = model.default_ops(cfg)
        dropped = torch.zeros(2)  # running (sum, count) of the dropped fractions
        run = ep_lib.parallel_experts(moe.run_experts, ep_group, capacity_factor, dropped)
        ops.moe = functools.partial(moe.moe_feed_forward, run_experts=run)
        mine = tokens.chunk(world)[rank]
        loss = model.loss_sum(params, mine[:, :-1], mine[:, 1:], cfg, ops)
        loss.backward()
        grads = {}
        for n, t in params.items():
            g = t.grad.clone()
            dist.all_reduce(g, group=expert_dp_group if ep_lib.is_expert_param(n) else None)
            grads[n] = g
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert dropped.tolist() == [0.0, cfg.n_layers if capacity_factor else 0]
        out[ep, capacity_factor] = (total, grads, ep_rank)
    return out


def test_expert_parallel_matches_single_process():
    cfg = CFG  # 2 blocks, both MoE, with a shared expert and the aux loss
    tokens = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    ref_params = {n: t.requires_grad_() for n, t in model.init(cfg, 0).items()}
    ref_loss = model.loss_sum(ref_params, tokens[:, :-1], tokens[:, 1:], cfg)
    ref_loss.backward()
    world = 4  # ep=2 (each expert shard on 2 ranks: grads summed over them) and ep=4
    for rank_out in run_ranks(world, _ep_rank, cfg, tokens):
        for (ep, capacity_factor), (loss, grads, ep_rank) in rank_out.items():
            assert_close(loss, ref_loss.detach(), what=f"ep {ep} (capacity factor {capacity_factor}) loss")
            for n, g in grads.items():
                ref = ref_params[n].grad
                if ep_lib.is_expert_param(n):
                    mine = ep_lib.expert_range(cfg.n_experts, ep_rank, ep)
                    ref = ref[mine.start:mine.stop]
                assert_close(g, ref, what=f"ep {ep} {n}")


def test_ep_folds_into_the_data_dims():
    # world 16 = dp_shard 4 x cp 2 x tp 2: the data groups are the 8 ranks of equal tp coordinate
    mesh = Mesh({"dp_shard": 4, "cp": 2, "tp": 2}, 0)
    ep_lists, expert_dp_lists = ep_lib.ep_layout(mesh, 4)
    assert ep_lists == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert expert_dp_lists == [[0, 8], [2, 10], [4, 12], [6, 14], [1, 9], [3, 11], [5, 13], [7, 15]]
    with pytest.raises(ValueError, match="must divide dp_shard"):
        ep_lib.ep_layout(mesh, 3)


def test_bad_expert_parallel_degree():
    with pytest.raises(ValueError, match="divisible"):
        ep_lib.shard_experts({"layers.0.moe.experts.w1": torch.zeros(6, 2, 2)}, 0, 4)


def test_plot_writes_the_load_heatmap(tmp_path):
    """`minititan plot` on a MoE run's metrics.jsonl also writes <chart>_moe_load.svg: a cell per MoE
    layer and logged step (neighbouring steps averaged beyond 300 columns) in each of its two panels;
    a dense run's metrics get no heat-map."""
    import json
    import re
    from click.testing import CliRunner
    from minititan.cli import main
    from minititan.moe_heatmap import load_heatmap_svg
    rows = [{"step": s, "loss": 1.0, "tokens_per_sec_per_device": 1.0,
             "moe/max_load_over_mean_by_layer": {"1": 1.0 + s / 100, "3": 2.0},
             "moe/min_load_over_mean_by_layer": {"1": 0.5, "3": 0.0}} for s in range(1, 701)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["plot", str(metrics)])
    assert result.exit_code == 0 and "metrics_moe_load.svg" in result.output, result.output
    svg = (tmp_path / "metrics_moe_load.svg").read_text()
    cells = re.findall(r"<title>layer (\d+), steps (\d+)-(\d+): ([\d.]+)</title>", svg)
    assert svg.count("<title>layer ") == 2 * 2 * 234  # 2 panels x 2 layers x ceil(700 / 3) columns of 3 steps
    assert ("1", "1", "3", "1.020") in cells and ("3", "697", "699", "0.000") in cells
    assert "up to 8" in svg  # the busiest panel's scale ends at the worst value: 1 + 700 / 100
    assert load_heatmap_svg([{"step": 1, "loss": 1.0}]) is None


def test_selective_checkpointing_keeps_the_grouped_gemm_outputs():
    """Under activation_checkpoint.selective = "op" the experts' grouped GEMMs are saved like the dense
    matmuls: the backward runs the six gradient GEMMs and does not run the three forward ones again."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from minititan.core.activation_checkpoint import block_runner

    class CountGroupedMM(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountGroupedMM.calls += func is torch.ops.aten._grouped_mm.default
            return func(*args, **(kwargs or {}))

    cfg = replace(CFG, n_shared_experts=0, aux_loss_coef=0.0)
    p, x = layer_params(cfg), torch.randn(2, 8, cfg.dim, requires_grad=True)
    ops = model.default_ops(cfg)
    y = block_runner("selective", "op")(ops.moe, p, x, cfg, ops)
    with CountGroupedMM():
        y.sum().backward()
    assert CountGroupedMM.calls == 3 * 2  # per projection: the input grad and the weight grad


def _scaled_grouped_mm_on_the_cpu(a, b, scale_a, scale_b, offs=None, out_dtype=None):
    """torch._scaled_grouped_mm's contract, for a CPU test: its own meta function checks the layouts and
    scale shapes, then the fp8 values times their scales go through the bf16-exact fp32 grouped GEMM."""
    torch.ops.aten._scaled_grouped_mm(a.to("meta"), b.to("meta"), scale_a.to("meta"), scale_b.to("meta"),
                                      offs=offs.to("meta"), out_dtype=out_dtype)
    a_real = a.float() * scale_a[:, None]
    b_real = b.float() * scale_b[:, None, :]  # b [E, K, N]: one scale per output column of each expert
    return torch._grouped_mm(a_real, b_real, offs=offs).to(out_dtype)


def test_float8_grouped_experts(monkeypatch):
    """The Float8 experts (float8_grouped.py) on the CPU through a stand-in for the Hopper kernel: the
    operands reach it in the layouts it accepts, and outputs and gradients stay within Float8's error
    of the bf16 grouped GEMMs (the weight gradient is bf16 itself)."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_on_the_cpu)
    monkeypatch.setattr(moe, "_float8_grouped_supported", lambda device_type: True)
    gen = torch.Generator().manual_seed(0)
    experts = {w: (torch.randn(4, 64, 32, generator=gen) if w != "w2" else torch.randn(4, 32, 64, generator=gen))
               * 0.2 for w in ("w1", "w2", "w3")}
    experts = {n: t.bfloat16().requires_grad_() for n, t in experts.items()}
    chosen = torch.randint(0, 4, (64 * 2,), generator=gen)
    order, counts = chosen.argsort(stable=True), moe.tokens_per_expert(chosen, 4)
    h = torch.randn(64, 32, generator=gen).bfloat16()
    fp8, bf16 = (grads_of(lambda p, h: moe.routed_experts(h, order, counts, p, 2, fp8=f), experts, h)
                 for f in (True, False))
    for got, want, what in [(fp8[0], bf16[0], "output"), (fp8[1], bf16[1], "input grad")] + [
            (fp8[2][n], bf16[2][n], n) for n in experts]:
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert 1e-4 < err < 0.08, f"{what}: rel diff {err:.3f}"  # fp8 (not bf16), within e4m3's rounding


def _capped_one_rank(rank, world):
    """The capped exchange on one rank: the first C rows of the chunk are computed, the rest dropped."""
    gen = torch.Generator().manual_seed(0)
    experts = {w: torch.randn(4, 16, 16, generator=gen) for w in ("w1", "w2", "w3")}
    counts = torch.tensor([20, 0, 30, 14])  # 64 rows: capacity 1.25 x 64 rounded to 16 rows is 80 rows
    x = torch.randn(64, 16, generator=gen)
    want = moe.run_experts_loop(x, counts, experts)
    dropped_full, dropped_half = torch.zeros(2), torch.zeros(2)  # running (sum, count) each
    full = ep_lib.parallel_experts(moe.run_experts, dist.group.WORLD, 1.25, dropped_full)(x, counts, experts)
    assert ep_lib.capacity(64, 1, 0.5) == 32
    half = ep_lib.parallel_experts(moe.run_experts, dist.group.WORLD, 0.5, dropped_half)(x, counts, experts)
    return want, full, half, (dropped_full.tolist(), dropped_half.tolist())


def test_capped_exchange_drops_what_overflows():
    want, full, half, dropped = run_ranks(1, _capped_one_rank)[0]
    assert_close(full, want, 1e-6, "within capacity")
    assert_close(half[:32], want[:32], 1e-6, "the first 32 rows (capacity 0.5 x 64)")
    assert torch.equal(half[32:], torch.zeros(32, 16))  # the rest dropped: no output
    assert dropped == ([0.0, 1.0], [0.5, 1.0])


class _HostReads(Exception):
    pass


@contextlib.contextmanager
def refusing_host_reads():
    """Every way a step could read a device value on the host (.tolist(), .item(), bool(), int()) raises."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RefuseScalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise _HostReads(str(func))
            return func(*args, **(kwargs or {}))

    def refuse(*args, **kwargs):
        raise _HostReads("tolist/item")

    saved = torch.Tensor.tolist, torch.Tensor.item
    torch.Tensor.tolist = torch.Tensor.item = refuse
    try:
        with RefuseScalars():
            yield
    finally:
        torch.Tensor.tolist, torch.Tensor.item = saved


def _layer_reads_host(rank, world, cfg, capacity_factor):
    """Forward + backward of a MoE layer under ep = world: does it read a device value on the host?"""
    p = {n: t.detach().clone().requires_grad_() for n, t in layer_params(cfg).items()}
    p = ep_lib.shard_experts(p, rank, world) if world > 1 else p
    p = {n: t.detach().requires_grad_() for n, t in p.items()}
    run = ep_lib.parallel_experts(moe.run_experts, dist.group.WORLD, capacity_factor) if world > 1 else None
    x = torch.randn(2, 8, cfg.dim, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    try:
        with refusing_host_reads():
            moe.moe_feed_forward(p, x, cfg, model.default_ops(cfg), run_experts=run,
                                 balance_log=torch.zeros(2)).sum().backward()
    except _HostReads:
        return True
    return False


def test_no_host_reads_in_the_layer():
    """One device: the grouped path reads nothing back. Expert parallel: the capped exchange reads
    nothing back; the exact one reads its split sizes (the check has teeth)."""
    cfg = replace(CFG, aux_loss_coef=0.01)
    assert run_ranks(1, _layer_reads_host, cfg, 0.0) == [False]
    assert run_ranks(2, _layer_reads_host, cfg, 2.0) == [False, False]
    assert run_ranks(2, _layer_reads_host, cfg, 0.0) == [True, True]


@pytest.mark.parametrize("override, words", [
    ("model.head_dim=-1", "model.head_dim must be zero or a positive number (0 = dim / n_heads)"),
    ("model.head_dim=15", "head dim 15 must be even"),
    ("model.n_dense_layers=4", "model.n_dense_layers=4 must be between 0 and model.n_layers - 1 = 3"),
    ("model.moe_frequency=0", "model.moe_frequency must be a positive number (1 = every block is MoE)"),
    ("model.shared_expert_gate=true", "set model.n_shared_experts >= 1"),
    ("model.route_scale=0", "model.route_scale must be a positive number (1 = the scores as they are)"),
])
def test_bad_moe_model_keys_name_the_fix(override, words):
    from minititan.core.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, ["model.name=moe", override])

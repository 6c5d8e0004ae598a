"""Pipeline schedules: the lists (coverage, dependencies, deadlock, bubbles against the
textbook), the viewer, the split backward, and the runtime on gloo against one process."""
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.distributed as dist

from minititan.core import model
from minititan.core.config import Model
from minititan.schedules import simulate as sim
from minititan.schedules import viewer
from minititan.schedules.runtime import run_pipeline
from minititan.schedules.schedule import COMPUTE, SCHEDULES, Action, DeadlockError, rank_stages, stage_rank
from minititan.schedules.split_backward import backward_input, frontier_nodes
from tests.distributed import run_ranks

LAYOUTS = [(name, pp, m, 2 if name == "interleaved_1f1b" else 1)
           for name in SCHEDULES for pp in (2, 4) for m in (4, 8)]


def all_lists(name, pp, m, v):
    return [SCHEDULES[name](r, pp, m, v) for r in range(pp)]


# ---------------------------------------------------------------- the lists


@pytest.mark.parametrize("name,pp,m,v", LAYOUTS)
def test_every_microbatch_goes_forward_and_backward_once_per_stage(name, pp, m, v):
    for r, actions in enumerate(all_lists(name, pp, m, v)):
        done = [a for a in actions if a.kind in COMPUTE]
        for s in rank_stages(r, pp, v):
            for mb in range(m):
                kinds = [a.kind for a in done if (a.stage, a.microbatch) == (s, mb)]
                assert kinds in (["F", "B"], ["F", "I", "W"]), (r, s, mb, kinds)
                # every stage boundary crosses ranks (pp > 1): one message each way per microbatch
                messages = [a.kind for a in actions if (a.stage, a.microbatch) == (s, mb) and a.kind not in COMPUTE]
                expected = {"RECV_F", "SEND_B"} if s > 0 else set()
                expected |= {"SEND_F", "RECV_B"} if s < pp * v - 1 else set()
                assert sorted(messages) == sorted(expected), (r, s, mb, messages)
        assert all(stage_rank(a.stage, pp) == r for a in actions)


@pytest.mark.parametrize("name,pp,m,v", LAYOUTS)
def test_simulation_respects_dependencies_without_deadlock(name, pp, m, v):
    timeline = sim.simulate(all_lists(name, pp, m, v))
    n_stages = pp * v
    end = {(s.action.kind, s.action.stage, s.action.microbatch): s.end for row in timeline.rows for s in row}
    for row in timeline.rows:
        for before, after in zip(row, row[1:]):
            assert before.end <= after.start
        for slot in row:
            kind, s, mb = slot.action
            needs = {"F": [("F", s - 1, mb)] if s > 0 else [], "W": [("I", s, mb)],
                     "B": [("F", s, mb)] + ([("B", s + 1, mb)] if s < n_stages - 1 else []),
                     "I": [("F", s, mb)] + ([("I", s + 1, mb)] if s < n_stages - 1 else [])}[kind]
            assert all(end[n] <= slot.start for n in needs), slot


def test_bubble_equals_the_textbook_formula():
    for pp in (2, 3, 4, 8):
        for m in range(1, 17):
            for name in ("gpipe", "1f1b"):
                assert sim.simulate_schedule(name, pp, m).bubble == pytest.approx(sim.textbook_bubble(name, pp, m))
            if m >= pp:  # ZB-H1's formula assumes the pipeline fills
                zb = sim.simulate_schedule("zero_bubble", pp, m)
                assert zb.bubble == pytest.approx(sim.textbook_bubble("zero_bubble", pp, m))
            for v in (2, 3):
                if m % pp == 0:
                    got = sim.simulate_schedule("interleaved_1f1b", pp, m, v).bubble
                    assert got == pytest.approx(sim.textbook_bubble("interleaved_1f1b", pp, m, v))


def test_zero_bubble_idles_a_third_of_1f1b():
    pp, m = 4, 8
    idle = {name: sim.simulate_schedule(name, pp, m).makespan - 3 * m for name in ("1f1b", "zero_bubble")}
    assert idle == {"1f1b": 3 * (pp - 1), "zero_bubble": pp - 1}


def test_communication_check_catches_deadlock_and_misordered_links():
    # both ranks send first, each in its own batch, and receive later: NCCL would hang
    rank0 = [Action("SEND_F", 0, 0), Action("F", 0, 5), Action("RECV_B", 0, 1)]
    rank1 = [Action("SEND_B", 1, 1), Action("F", 1, 5), Action("RECV_F", 1, 0)]
    with pytest.raises(DeadlockError, match="communication deadlock"):
        sim.check_communication([rank0, rank1])
    # rank 1 receives microbatch 1 before microbatch 0: NCCL would swap the tensors
    rank0 = [Action("SEND_F", 0, 0), Action("SEND_F", 0, 1)]
    rank1 = [Action("RECV_F", 1, 1), Action("RECV_F", 1, 0)]
    with pytest.raises(DeadlockError, match="another order"):
        sim.check_communication([rank0, rank1])
    # a compute order that waits in a cycle
    with pytest.raises(DeadlockError, match="compute deadlock"):
        sim.simulate([[Action("B", 0, 0), Action("F", 0, 0)], [Action("F", 1, 0), Action("B", 1, 0)]])


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 4"):
        SCHEDULES["interleaved_1f1b"](0, 4, 6, 2)
    with pytest.raises(ValueError, match="virtual"):
        SCHEDULES["interleaved_1f1b"](0, 4, 8, 1)
    with pytest.raises(ValueError, match="interleaved_1f1b"):
        SCHEDULES["1f1b"](0, 4, 8, 2)
    with pytest.raises(ValueError, match="pp rank"):
        SCHEDULES["gpipe"](4, 4, 8, 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        sim.simulate_schedule("dualpipe", 4, 8)


def test_viewer_prints_timeline_and_bubbles(tmp_path, capsys):
    svg = tmp_path / "t.svg"
    timeline = viewer.main(4, 8, "interleaved_1f1b", 2, str(svg))
    out = capsys.readouterr().out
    assert "rank 3 |" in out and "f7" in out and "B0" in out  # chunk 1 is lowercase
    assert "bubble 15.8% simulated, 15.8% textbook" in out
    root = ET.fromstring(svg.read_text())
    assert sum(1 for e in root.iter() if e.tag.endswith("rect")) == 1 + 4 + 4 * 8 * 2 * 2
    text = viewer.render_text(sim.simulate_schedule("1f1b", 2, 2))
    assert text.splitlines() == ["rank 0 |F0 F1 .  .  B0    .  B1", "rank 1 |.  F0 B0    F1 B1    .  ."]
    assert timeline.bubble == pytest.approx(3 / 19)


# ---------------------------------------------------------------- split backward


class CountBackward(torch.autograd.Function):
    """Identity that counts its backward calls: the input path must run once over I + W."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


def toy_params(n_layers=8, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [t.requires_grad_() for _ in range(n_layers)
            for t in (torch.randn(dim, dim, generator=gen) / dim ** 0.5, torch.randn(dim, generator=gen) * 0.1)]


def toy_layers(params, x, layers, compute_dtype=torch.float32):
    for i in layers:
        w, b = params[2 * i].to(compute_dtype), params[2 * i + 1].to(compute_dtype)
        x = CountBackward.apply(torch.tanh(torch.nn.functional.linear(x, w, b)))
    return x


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])  # float64: a cast node on each weight
def test_split_backward_equals_full_backward_and_runs_the_input_path_once(compute_dtype):
    params = toy_params(4)
    x0, g = torch.randn(2, 3, 16, dtype=compute_dtype), torch.randn(2, 3, 16, dtype=compute_dtype)
    x = x0.clone().requires_grad_()
    toy_layers(params, x, range(4), compute_dtype).backward(g)
    want = [p.grad.clone() for p in params] + [x.grad]
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_()
    y = toy_layers(params, x, range(4), compute_dtype)
    CountBackward.calls = 0
    x_grad, backward_weight = backward_input(y, g, x)
    assert all(p.grad is None for p in params) and CountBackward.calls == 4
    backward_weight()
    assert CountBackward.calls == 4
    for got, ref in zip([p.grad for p in params] + [x_grad], want):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_split_backward_does_not_split_tied_weights():
    w = torch.randn(8, 8, requires_grad=True)
    x0, g = torch.randn(3, 8), torch.randn(3, 8)
    x = x0.clone().requires_grad_()
    (torch.tanh(x @ w) @ w).backward(g)
    want_w, want_x = w.grad.clone(), x.grad.clone()
    w.grad = None
    x = x0.clone().requires_grad_()
    y = torch.tanh(x @ w) @ w
    assert frontier_nodes(y, x) is None
    x_grad, backward_weight = backward_input(y, g, x)
    backward_weight()
    torch.testing.assert_close(w.grad, want_w)
    torch.testing.assert_close(x_grad, want_x)


class GatherViews(torch.autograd.Function):
    """Like FSDP's gather: one node makes all of a unit's weights, as views of one buffer;
    its backward (FSDP's reduce-scatter) must run once per unit, in W."""
    calls = 0

    @staticmethod
    def forward(ctx, flat, *shapes):
        ctx.shapes = shapes
        return tuple(t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))

    @staticmethod
    def backward(ctx, *grads):
        GatherViews.calls += 1
        flat = [torch.zeros(s) if g is None else g for g, s in zip(grads, ctx.shapes)]
        return (torch.cat([g.reshape(-1) for g in flat]),) + (None,) * len(ctx.shapes)


def test_split_backward_splits_weights_made_by_one_gather_node():
    dim, shapes = 8, (torch.Size([8]), torch.Size([8, 8]), torch.Size([8, 8]))
    flats = [torch.randn(sum(s.numel() for s in shapes), requires_grad=True) for _ in range(2)]

    def unit_layers(x):
        for flat in flats:
            norm, w1, w2 = GatherViews.apply(flat, *shapes)
            h = torch.nn.functional.linear(torch.tanh(x * norm), w1)  # w1's own transpose node, as in the model
            x = CountBackward.apply(x + torch.nn.functional.linear(h, w2))
        return x

    x0, g = torch.randn(3, dim), torch.randn(3, dim)
    x = x0.clone().requires_grad_()
    unit_layers(x).backward(g)
    want = [f.grad.clone() for f in flats] + [x.grad]
    for f in flats:
        f.grad = None
    x = x0.clone().requires_grad_()
    y = unit_layers(x)
    assert len(frontier_nodes(y, x)) == 2 * 3
    CountBackward.calls = GatherViews.calls = 0
    x_grad, backward_weight = backward_input(y, g, x)
    assert (CountBackward.calls, GatherViews.calls) == (2, 0)
    backward_weight()
    assert (CountBackward.calls, GatherViews.calls) == (2, 2)
    for got, ref in zip([f.grad for f in flats] + [x_grad], want):
        torch.testing.assert_close(got, ref)


class Matmul(torch.autograd.Function):
    """A custom Function computes every gradient whenever it runs: not worth splitting."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.T, x.T @ grad


def test_split_backward_does_not_split_custom_functions():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    y = torch.tanh(Matmul.apply(x, w))
    assert frontier_nodes(y, x) is None
    x_grad, backward_weight = backward_input(y, torch.ones(3, 8), x)
    backward_weight()
    x_ref, w_ref = torch.autograd.grad(torch.tanh(x @ w), (x, w), torch.ones(3, 8))
    torch.testing.assert_close(x_grad, x_ref)
    torch.testing.assert_close(w.grad, w_ref)


def llama_cfg() -> Model:
    return Model(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)


def test_split_backward_splits_llama_layers():
    cfg = llama_cfg()
    params = {n: t.requires_grad_() for n, t in model.init(cfg, seed=0).items()}
    ops = model.default_ops(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    x0, g = torch.randn(2, 16, cfg.dim), torch.randn(2, 16, cfg.dim)
    x = x0.clone().requires_grad_()
    model.hidden(params, tokens, cfg, ops, layers=range(1, 3), x=x).backward(g)
    want = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    want_x = x.grad
    for p in params.values():
        p.grad = None
    x = x0.clone().requires_grad_()
    y = model.hidden(params, tokens, cfg, ops, layers=range(1, 3), x=x)
    assert len(frontier_nodes(y, x)) == 2 * 9  # per layer: 2 norms and 7 matmuls
    x_grad, backward_weight = backward_input(y, g, x)
    backward_weight()
    torch.testing.assert_close(x_grad, want_x)
    assert {n for n, p in params.items() if p.grad is not None} == set(want)
    for n, ref in want.items():
        torch.testing.assert_close(params[n].grad, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the runtime against one process

MB_SHAPE = (2, 3, 16)  # per microbatch: batch 2, seq 3, dim 16


def toy_data(m):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(MB_SHAPE, generator=gen) for _ in range(m)], [torch.randn(MB_SHAPE, generator=gen) for _ in range(m)]


def toy_stages(params, stage_ids, n_stages, m, n_layers=8):
    inputs, targets = toy_data(m)
    per = n_layers // n_stages

    def make(s):
        def forward(x, mb):
            y = toy_layers(params, inputs[mb] if x is None else x, range(s * per, (s + 1) * per))
            if s < n_stages - 1:
                return y
            return ((y - targets[mb]) ** 2).sum() / (m * targets[mb].numel())  # the global mean, summed per mb
        return forward
    return {s: make(s) for s in stage_ids}


def toy_reference(m):
    params = toy_params()
    loss = sum(toy_stages(params, [0], 1, m)[0](None, mb) for mb in range(m))
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def llama_batches(cfg, m):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(0, cfg.vocab_size, (2, 32), generator=gen),
             torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)) for _ in range(m)]


def llama_stages(params, cfg, stage_ids, n_stages, m):
    """What the trainer glue builds: the first stage embeds, the last adds norm + output +
    loss; each runs its slice of layers with model.hidden."""
    ops, batches = model.default_ops(cfg), llama_batches(cfg, m)
    n_tokens = sum(labels.numel() for _, labels in batches)
    per = cfg.n_layers // n_stages

    def make(s):
        def forward(x, mb):
            tokens, labels = batches[mb]
            h = model.hidden(params, tokens, cfg, ops, layers=range(s * per, (s + 1) * per), x=x)
            if s < n_stages - 1:
                return h
            h, w_out = model.final_hidden(params, h, cfg, ops)
            return ops.cross_entropy(h, w_out, labels, ops.linear) / n_tokens
        return forward
    return {s: make(s) for s in stage_ids}


def llama_reference(m):
    cfg = llama_cfg()
    params = {n: t.requires_grad_() for n, t in model.init(cfg, seed=0).items()}
    batches = llama_batches(cfg, m)
    n_tokens = sum(labels.numel() for _, labels in batches)
    loss = sum(model.loss_sum(params, tokens, labels, cfg) for tokens, labels in batches) / n_tokens
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in params.items()}


def run_toy(rank, pp, group, name, v, m):
    params = toy_params()
    n_stages = pp * v
    actions = SCHEDULES[name](rank, pp, m, v)
    stages = toy_stages(params, rank_stages(rank, pp, v), n_stages, m)
    loss = run_pipeline(actions, stages, n_stages, group, MB_SHAPE, torch.float32, "cpu")
    return loss, {i: p.grad for i, p in enumerate(params) if p.grad is not None}


def run_llama(rank, pp, group, name, v, m):
    cfg = llama_cfg()
    params = {n: t.requires_grad_() for n, t in model.init(cfg, seed=0).items()}
    n_stages = pp * v
    actions = SCHEDULES[name](rank, pp, m, v)
    stages = llama_stages(params, cfg, rank_stages(rank, pp, v), n_stages, m)
    loss = run_pipeline(actions, stages, n_stages, group, (2, 32, cfg.dim), torch.float32, "cpu")
    return loss, {n: p.grad for n, p in params.items() if p.grad is not None}


def _pipeline_ranks(rank, world, todo):
    return [runner(rank, world, dist.group.WORLD, name, v, m) for runner, name, v, m in todo]


def assert_matches(per_rank, reference):
    """The loss (on the last rank) and every gradient (each on exactly one rank) match."""
    want_loss, want_grads = reference
    loss = per_rank[-1][0]
    assert all(r[0] is None for r in per_rank[:-1])
    assert (loss - want_loss).abs() <= 1e-5 * want_loss.abs()
    names = list(want_grads) if isinstance(want_grads, dict) else range(len(want_grads))
    for n in names:
        holders = [r[1][n] for r in per_rank if n in r[1]]
        assert len(holders) == 1, n
        got, want = holders[0], want_grads[n]
        assert (got - want).norm() <= 1e-5 * want.norm(), n


def cases(runner, m):
    """Every schedule, interleaved with 2 chunks per rank."""
    return [(runner, name, 2 if name == "interleaved_1f1b" else 1, m) for name in SCHEDULES]


def test_runtime_on_one_process_matches_reference():
    """pp 1: no messages; interleaved hands tensors between its two local stages."""
    want = toy_reference(4)
    for runner, name, v, m in cases(run_toy, 4):
        assert_matches([run_toy(0, 1, None, name, v, m)], want)


def test_runtime_pp2_matches_one_process_toy_and_llama():
    todo = cases(run_toy, 4) + cases(run_llama, 4)
    results = run_ranks(2, _pipeline_ranks, todo)
    toy, llama = toy_reference(4), llama_reference(4)
    for i, (runner, name, v, m) in enumerate(todo):
        assert_matches([r[i] for r in results], toy if runner is run_toy else llama)


def test_runtime_pp4_matches_one_process():
    todo = cases(run_toy, 8)
    results = run_ranks(4, _pipeline_ranks, todo)
    want = toy_reference(8)
    for i in range(len(todo)):
        assert_matches([r[i] for r in results], want)

"""FSDP / HSDP parity with the single-process model on gloo, plus its layout, memory and errors.

Each rank runs model.loss_sum on its rows of the global batch with ops.gather = fsdp.gather;
the summed loss and the gathered gradients must match one process running the whole batch.
"""
from __future__ import annotations

import dataclasses
import math
import time
import weakref

import pytest
import torch
import torch.distributed as dist

from minititan.collectives import fsdp as fsdp_lib
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.config import Model
from tests.distributed import run_ranks

CFG = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
# sizes that are not multiples of 16: alignment gaps between parameters inside a unit's buffer
ODD = Model(dim=40, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=257, multiple_of=32)
SEQ, BATCH, SEED = 32, 8, 0
GLOBAL_TOKENS = BATCH * SEQ
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def global_batch(step: int, cfg: Model = CFG):
    g = torch.Generator().manual_seed(1000 + step)
    t = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
    return t[:, :-1], t[:, 1:]


# ---------------------------------------------------------------- the single-process reference


def reference(steps: int, cfg: Model = CFG):
    """Losses per step and the first step's full gradients, one process, whole batch."""
    params = {n: t.requires_grad_() for n, t in model.init(cfg, SEED).items()}
    opt = torch.optim.AdamW(params.values(), **ADAMW)
    losses, grads = [], None
    for step in range(max(steps, 1)):
        opt.zero_grad()
        loss = model.loss_sum(params, *global_batch(step, cfg), cfg) / GLOBAL_TOKENS
        loss.backward()
        losses.append(loss.item())
        if grads is None:
            grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
    return losses, grads


# ---------------------------------------------------------------- what each rank runs


@dataclasses.dataclass
class Case:
    replicate: int = 1  # HSDP replicas (the rest of the world shards)
    reshard: bool = True
    micro: int = 1  # micro-batches per step
    keep_unsharded: bool = False  # reduce_grads=False for all but the last micro-batch
    dtype: torch.dtype = torch.float32
    steps: int = 0  # AdamW steps over the shards (0 = only the first backward)
    odd_sizes: bool = False  # the ODD model instead of CFG

    @property
    def cfg(self) -> Model:
        return ODD if self.odd_sizes else CFG


def _groups(rank, world, replicate):
    if replicate == 1:
        return dist.group.WORLD, None
    mesh = Mesh({"dp_replicate": replicate, "dp_shard": world // replicate}, rank)
    return mesh.group("dp_shard"), mesh.group("dp_replicate")


def fsdp_ops(fsdp, cfg: Model = CFG):
    """The model's ops with FSDP's gather, renamed to the names a unit's function sees."""
    gather = lambda params, unit: {model.local_name(n): t for n, t in fsdp.gather(unit).items()}
    return dataclasses.replace(model.default_ops(cfg), gather=gather)


def train_steps(fsdp, rank, world, case: Case):
    """Forward/backward over this rank's rows (in micro-batches), optionally AdamW steps; the global losses."""
    ops, rows = fsdp_ops(fsdp, case.cfg), BATCH // world
    opt = torch.optim.AdamW(fsdp.shards.values(), **ADAMW)
    losses = []
    for step in range(max(case.steps, 1)):
        opt.zero_grad()
        x, y = (t[rank * rows:(rank + 1) * rows] for t in global_batch(step, case.cfg))
        loss_share = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.chunk(case.micro), y.chunk(case.micro))):
            fsdp.reduce_grads = not case.keep_unsharded or i == case.micro - 1
            with fsdp.resharding():
                loss = model.loss_sum({}, xm, ym, case.cfg, ops) / GLOBAL_TOKENS
            loss.backward()
            loss_share += loss.detach()
        fsdp.finish_grad_sync()
        dist.all_reduce(loss_share)
        losses.append(loss_share.item())
        if step == 0:
            grads = fsdp.unshard({u: s.grad for u, s in fsdp.shards.items()})
            norm_sq = fsdp.grad_norm_sq()
        if case.steps:
            opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    return losses, grads, norm_sq, state_bytes


def _run_cases(rank, world, cases):
    """Run each case; compare with the reference here and send back only numbers."""
    out = []
    for case in cases:
        full = model.init(case.cfg, SEED)
        ref_losses, ref_grads = reference(max(case.steps, 1), case.cfg)
        ref_norm_sq = sum(g.pow(2).sum() for g in ref_grads.values())
        shard_group, replicate_group = _groups(rank, world, case.replicate)
        fsdp = fsdp_lib.shard_params(full, model.units(case.cfg), shard_group, replicate_group,
                                     param_dtype=case.dtype, reshard_after_forward=case.reshard)
        losses, grads, norm_sq, state_bytes = train_steps(fsdp, rank, world, case)
        out.append(dict(
            loss_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            grad_err=max((((grads[n] - g).norm() / g.norm()).item(), n) for n, g in ref_grads.items()),
            norm_err=(abs(norm_sq - ref_norm_sq) / ref_norm_sq).item(),
            param_bytes=sum(s.numel() * s.element_size() for s in fsdp.shards.values()),
            state_bytes=state_bytes,
            padding=sum(lay.padded_numel - lay.numel for lay in fsdp.layouts.values()),
            shard_world=dist.get_world_size(shard_group)))
    return out


def check_case(result, case: Case):
    tol = 1e-5 if case.dtype == torch.float32 else 1e-2  # bf16 compute against the fp32 reference
    assert result["loss_err"] < tol, f"{case}: loss rel err {result['loss_err']:.2e}"
    err, name = result["grad_err"]
    assert err < tol, f"{case}: grad of {name} rel err {err:.2e}"
    assert result["norm_err"] < tol, f"{case}: grad norm rel err {result['norm_err']:.2e}"
    # memory: each rank holds 1/dp_shard of the params (+ padding), and so does AdamW's state
    total, world, units = model.num_params(case.cfg), result["shard_world"], model.units(case.cfg)
    assert result["param_bytes"] * world == (total + result["padding"]) * 4
    assert result["padding"] < sum(len(names) * fsdp_lib.ALIGN + world for names in units.values())
    if case.steps:
        assert result["state_bytes"] == 2 * result["param_bytes"]


CASES_2 = [Case(), Case(reshard=False, micro=2), Case(micro=2, keep_unsharded=True), Case(steps=3),
           Case(dtype=torch.bfloat16, micro=2), Case(odd_sizes=True, micro=2, steps=2)]
CASES_4 = [Case(micro=2), Case(reshard=False), Case(replicate=2, micro=2), Case(replicate=2, reshard=False, steps=3),
           Case(replicate=2, micro=2, keep_unsharded=True, dtype=torch.bfloat16), Case(odd_sizes=True, replicate=2)]


@pytest.mark.parametrize("world, cases", [(2, CASES_2), (4, CASES_4)], ids=["dp_shard2", "dp_shard4_and_hsdp2x2"])
def test_matches_single_process(world, cases):
    for rank_result in run_ranks(world, _run_cases, cases):  # every rank, replicas included
        for result, case in zip(rank_result, cases):
            check_case(result, case)


# ---------------------------------------------------------------- resharding, checkpoints, errors


def watch_all_gathers(fsdp):
    """Weak references to every gathered buffer, and the units whose buffer came from a prefetch."""
    buffers, prefetched = [], []
    start, take = fsdp._start_all_gather, fsdp._take_prefetched

    def start_and_watch(unit):
        start(unit)
        buffers.append(weakref.ref(fsdp._in_flight[unit][1]))

    def take_and_count(unit):
        full = take(unit)
        if full is not None:
            prefetched.append(unit)
        return full

    fsdp._start_all_gather, fsdp._take_prefetched = start_and_watch, take_and_count
    return buffers, prefetched


def count_alive(buffers, expected: int) -> int:
    """How many watched buffers are alive, given up to 2 s to fall to `expected`: gloo's worker thread
    drops its reference to a finished all-gather's output a moment after work.wait() returns."""
    deadline = time.monotonic() + 2
    while (alive := sum(b() is not None for b in buffers)) > expected and time.monotonic() < deadline:
        time.sleep(0.005)
    return alive


def _mechanics(rank, world):
    full = model.init(CFG, SEED)
    units = model.units(CFG)
    out = {}
    # 1. what stays alive between forward and backward, and how often backward gathers again
    for reshard in (True, False):
        fsdp = fsdp_lib.shard_params(full, units, dist.group.WORLD, reshard_after_forward=reshard)
        buffers, prefetched = watch_all_gathers(fsdp)
        x, y = (t[rank * 2:(rank + 1) * 2] for t in global_batch(0))
        with fsdp.resharding():
            loss = model.loss_sum({}, x, y, CFG, fsdp_ops(fsdp))
        alive = count_alive(buffers, expected=1 if reshard else len(buffers))
        gathers_forward, prefetched_forward = len(buffers), len(prefetched)
        loss.backward()
        fsdp.finish_grad_sync()
        out[reshard] = dict(alive=alive, forward=gathers_forward, backward=len(buffers) - gathers_forward,
                            prefetched_forward=prefetched_forward, prefetched=len(prefetched),
                            alive_after=count_alive(buffers, expected=0))
    # 2. checkpoint ranges: a fresh FSDP filled from flat ranges equals one loaded from full tensors
    fresh = fsdp_lib.FSDP(model.param_shapes(CFG), units, dist.group.WORLD)
    pieces = {}
    for unit in units:
        for name, (start, stop, _) in fresh.shard_ranges(unit).items():
            fresh.param_slice(name).copy_(full[name].reshape(-1)[start:stop])
            pieces[name] = (start, stop, fsdp.param_slice(name).tolist())
    out["ranges_equal"] = all(torch.equal(fresh.shards[u], fsdp.shards[u]) for u in units)
    out["pieces"] = pieces
    # 3. bad use gives a clear error, not a hang
    resharded = fsdp_lib.shard_params(full, units, dist.group.WORLD)
    try:
        model.loss_sum({}, x, y, CFG, fsdp_ops(resharded))
    except ValueError as e:
        out["outside_error"] = str(e)
    try:
        resharded.gather("layers.9.attention")
    except ValueError as e:
        out["unknown_unit_error"] = str(e)
    with torch.no_grad():  # no autograd, nothing to save: no context needed
        out["no_grad_loss"] = model.loss_sum({}, x, y, CFG, fsdp_ops(resharded)).item()
    return out


def test_resharding_checkpoint_ranges_and_errors():
    results = run_ranks(2, _mechanics)
    n_units = len(model.units(CFG))
    on, off = results[0][True], results[0][False]
    assert on["forward"] == off["forward"] == n_units  # one gather per unit (each prefetched by the one before)
    assert on["alive"] == 1  # only the last unit's params outlive the forward; the others were freed
    assert off["alive"] >= n_units - 1  # (the embedding saves no weight for backward)
    assert on["backward"] == 2 * CFG.n_layers and off["backward"] == 0  # blocks gathered again in backward
    # every gather but the first of the forward was started ahead of time, and so was every re-gather
    assert on["prefetched_forward"] == off["prefetched_forward"] == n_units - 1
    assert on["prefetched"] == n_units - 1 + 2 * CFG.n_layers
    assert on["alive_after"] == off["alive_after"] == 0
    for r in results:
        assert r["ranges_equal"]
        assert "with fsdp.resharding()" in r["outside_error"]
        assert "unknown unit" in r["unknown_unit_error"]
    assert results[0]["no_grad_loss"] > 0
    # every element of every parameter is held by exactly one rank
    full = model.init(CFG, SEED)
    for name, t in full.items():
        rebuilt = torch.full((t.numel(),), float("nan"))
        for r in results:
            if name in r["pieces"]:
                start, stop, values = r["pieces"][name]
                assert rebuilt[start:stop].isnan().all()
                rebuilt[start:stop] = torch.tensor(values)
        assert torch.equal(rebuilt.view(t.shape), t), name


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_layout_covers_every_element_once(world):
    shapes = model.param_shapes(CFG)
    for unit, names in model.units(CFG).items():
        layouts = [fsdp_lib.plan_unit(names, shapes, world, r) for r in range(world)]
        lay = layouts[0]
        assert lay.padded_numel == lay.shard_numel * world and all(o % fsdp_lib.ALIGN == 0 for o in lay.offsets)
        covered = {n: 0 for n in names}
        for layout in layouts:
            for name, (start, stop, offset) in fsdp_lib.shard_ranges(layout).items():
                assert 0 <= offset and offset + stop - start <= layout.shard_numel
                covered[name] += stop - start
        assert covered == {n: math.prod(shapes[n]) for n in names}, unit


def test_bad_units_are_clear_errors():
    shapes = model.param_shapes(CFG)
    with pytest.raises(ValueError, match="no shape"):
        fsdp_lib.FSDP(shapes, {"u": ["nope"]}, None)
    with pytest.raises(ValueError, match="put each parameter in one unit"):
        fsdp_lib.FSDP(shapes, {"a": ["norm"], "b": ["norm"]}, None)
    with pytest.raises(ValueError, match="param_dtype"):
        fsdp_lib.FSDP(shapes, {"a": ["norm"]}, None, param_dtype=torch.int8)

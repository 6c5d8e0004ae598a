"""minititan plan and train --dry-run: the dry run against real gloo runs, at scale, and the CLI.

A dry run needs a process without a process group (it makes a fake one of the target world
size), so every dry run here runs in a worker process of its own (`dry_runs`)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import _CONTEXT, run_ranks
from tests import harness
from tests.harness import TINY, assert_one_line_error

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _dry(job):
    from minititan.core.config import load_config
    from minititan.plan.dryrun import dry_run
    path, overrides, world, rank, capability = job
    return dry_run(load_config(path, overrides), world, rank, capability)


def dry_runs(jobs: list[tuple]) -> list:
    """(config path, overrides, world, rank, capability) -> RankRun, on two worker processes."""
    with _CONTEXT.Pool(2) as pool:
        return pool.map(_dry, jobs, chunksize=1)


# ---------------------------------------------------------------- against real gloo runs


def _real_step(rank, world, overrides, measure_peak):
    """One real training step of this layout: the state bytes the rank holds when its gradients
    are complete, and (measure_peak) the peak of live bytes during a second step above what was
    alive when it began: every storage the step's ops make is a CPU allocation, counted from the
    op that makes it until its last tensor dies (a dispatch mode with the dry run's counter, on
    real tensors). torch.profiler's memory records cannot say this: they book an op's
    allocations net of the frees inside it, and miss peaks within an op."""
    from minititan import train
    from minititan.core.config import load_config
    from minititan.core.data import TokenSource, rank_slice
    from minititan.core.guard import StepGuard
    from minititan.core.optim import AdamW
    from minititan.plan.dryrun import count_state
    from minititan.plan.memory import MemoryTracker
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    cfg = load_config(None, overrides)
    device, mesh, layout = train.setup(cfg)
    optimizer = AdamW(layout.params, cfg.optimizer)
    t = cfg.training
    rows = rank_slice(layout.facts.data_rank, layout.facts.data_size, t.global_batch_size)
    batches = [TokenSource("synthetic", cfg.model.vocab_size).read(t.seed, step, t.global_batch_size, t.seq_len,
                                                                    rows=rows) for step in (1, 2)]
    state = {}
    layout.finish_grads.append(lambda: state.update(count_state(layout, optimizer)))
    guard = StepGuard(device, 0, lambda: False, str, rank)
    train.train_step(cfg, layout, optimizer, batches[0], 1, layout.facts.n_micro, device, guard)
    if not measure_peak:
        return state, None
    memory = MemoryTracker(block=1)
    for t_ in [*layout.params.values(), *optimizer.exp_avg.values(), *optimizer.exp_avg_sq.values(),
               optimizer._step_on_device]:
        memory.track(t_, "other")  # alive before the step
    memory.reset_peak()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            memory.on_op(tree_flatten(out)[0])
            return out

    start = memory.live
    with Count():
        train.train_step(cfg, layout, optimizer, batches[1], 2, layout.facts.n_micro, device, guard)
    return state, memory.peak - start


STATE_LAYOUTS = [
    (4, ["parallelism.dp_shard=4"]),
    (4, ["parallelism.dp_replicate=2", "parallelism.dp_shard=2"]),
    (4, ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.dp_shard=2"]),
    (4, ["parallelism.pp=2", "parallelism.dp_shard=2"]),
    (4, ["parallelism.cp=2", "parallelism.dp_replicate=2"]),
    (4, ["model.name=moe", "model.n_experts=4", "model.top_k=2", "parallelism.dp_shard=4", "parallelism.ep=2",
         "training.param_dtype=bfloat16"]),  # the grouped GEMM's meta kernel takes bf16 only
]


@pytest.mark.parametrize("world, overrides", STATE_LAYOUTS, ids=["fsdp4", "hsdp2x2", "tp2sp_fsdp2", "pp2_fsdp2",
                                                                   "cp2_dp2", "moe_ep2_fsdp4"])
def test_dry_run_holds_the_state_bytes_of_a_real_run(world, overrides):
    """Every rank's params, grads and optimizer moments: the dry run's bytes are the real run's."""
    overrides = TINY + overrides
    real = run_ranks(world, _real_step, overrides, False)
    dry = dry_runs([(None, overrides, world, rank, None) for rank in range(world)])
    for rank in range(world):
        assert dry[rank].state_bytes == real[rank][0], f"rank {rank}"


@pytest.mark.parametrize("world, overrides, tolerance", [
    (1, ["activation_checkpoint.mode=none"], 0.01),
    (1, ["activation_checkpoint.mode=full"], 0.01),
    (1, ["activation_checkpoint.mode=selective", "training.param_dtype=bfloat16"], 0.01),
    # gloo's async work handles keep their tensors until the handle dies; NCCL's (and the fake
    # group's) let go at wait(). Under sequence parallel that is one activation-sized buffer (128 KiB
    # here, 1.9% of the peak) alive or not at the peak depending on when gloo's thread drops it;
    # FSDP's reduce-scatter buffer outlives its wait by one unit on gloo
    (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true"], 0.03),
    (2, ["parallelism.dp_shard=2", "activation_checkpoint.mode=selective"], 0.10),
], ids=["no_ac", "full_ac", "selective_ac_bf16", "tp2_sp", "fsdp2_selective"])
def test_dry_run_peak_is_the_real_runs(world, overrides, tolerance):
    """The step's peak of live bytes above what it starts with: the dry run (fake tensors, fake
    process group) against the real run's allocations on gloo, every rank."""
    overrides = TINY + ["model.dim=256", "model.n_heads=8", "training.seq_len=64", "model.max_seq_len=64"] + overrides
    real = run_ranks(world, _real_step, overrides, True)
    dry = dry_runs([(None, overrides, world, rank, None) for rank in range(world)])
    for rank in range(world):
        measured, predicted = real[rank][1], dry[rank].peak_bytes - dry[rank].start_bytes
        assert abs(predicted - measured) / measured < tolerance, (rank, predicted, measured)


def test_a_compiled_dry_run_traces_the_gpu_branches():
    """Under compile the dry run traces each block as the GPU runs it: the MoE layer with its
    grouped GEMMs, not the CPU's loop over experts (whose host read would leave the layer eager)."""
    path = str(CONFIGS / "moe_4b.toml")
    small = ["model.n_layers=2", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=2", "model.moe_hidden_dim=256",
             "model.vocab_size=512", "training.seq_len=128", "training.local_batch_size=1",
             "training.global_batch_size=1", "compile.enable=true"]
    [run] = dry_runs([(path, small, 1, 0, (9, 0))])
    assert run.eager_under_compile == []
    kinds = {e[2] for e in run.events if e[0] == "op"}
    assert "grouped gemm" in kinds and "gemm" in kinds
    # 128 tokens x top 2 in a buffer of 256 + 8 experts x 16 alignment rows: 48 rows a group, the
    # smallest dimension of every grouped GEMM (forward, input and weight gradients), which prices
    # it (timing.grouped_gemm_rolloff)
    assert {e[7] for e in run.events if e[0] == "op" and e[2] == "grouped gemm"} == {48}


def _dry_with_eager(job):
    """_dry with the compiled blocks named in job[0] run eagerly, as if the stand-in could not trace them
    (in a process of its own: the stand-in keeps what it traced, or refused, for the process)."""
    from minititan.plan import compiled
    trace = compiled.AotFunction._trace

    def refuse(self, key, *rest):
        if compiled._name(self.fn) in job[0]:
            compiled._FAILED[key] = f"{compiled._name(self.fn)} (run eagerly by the test)"
            return None
        return trace(self, key, *rest)
    compiled.AotFunction._trace = refuse
    return _dry(job[1:])


def test_a_compiled_dry_run_prices_expert_parallel_as_dynamo_compiles_it():
    """Under compile the dry run runs an expert-parallel MoE layer as torch.compile does (docs/plan.md):
    the capped exchange traced whole, its all-to-alls recorded as the eager layer's; the exact exchange
    traced around its host read without activation checkpointing (dynamo compiles the pieces on
    either side) and under full AC (checkpointed outside its compiled pieces), and eagerly inside a
    selective policy (dynamo cannot break a checkpointed graph). Traced, the step
    is faster than with the MoE layer run eagerly."""
    from minititan.plan import devices
    from minititan.plan.timing import step_time
    path = str(CONFIGS / "moe_4b.toml")
    small = ["model.n_layers=2", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=2", "model.moe_hidden_dim=256",
             "model.vocab_size=512", "training.seq_len=128", "training.local_batch_size=1",
             "training.global_batch_size=2", "compile.enable=true", "parallelism.dp_shard=2", "parallelism.ep=2"]
    capped = small + ["parallelism.ep_capacity_factor=1.25", "activation_checkpoint.mode=selective"]
    exact = small + ["parallelism.ep_capacity_factor=0"]
    with _CONTEXT.Pool(2, maxtasksperchild=1) as pool:
        traced, eager, exact_none, exact_selective, exact_full = pool.map(_dry_with_eager, [
            ((), path, capped, 2, 0, (9, 0)), (("moe_layer",), path, capped, 2, 0, (9, 0)),
            ((), path, exact + ["activation_checkpoint.mode=none"], 2, 0, (9, 0)),
            ((), path, exact + ["activation_checkpoint.mode=selective"], 2, 0, (9, 0)),
            ((), path, exact + ["activation_checkpoint.mode=full"], 2, 0, (9, 0))], chunksize=1)
    # full AC: block_runner checkpoints the exact exchange's layer outside its compiled pieces
    assert traced.eager_under_compile == exact_none.eager_under_compile == exact_full.eager_under_compile == []
    assert [why.split(" (")[0] for why in exact_selective.eager_under_compile] == ["moe_layer"]
    assert "eager in the real step too" in exact_selective.eager_under_compile[0]

    def all_to_alls(run):
        return sorted((e[1].nbytes, e[1].phase) for e in run.events if e[0] == "issue" and e[1].kind == "all_to_all")
    assert all_to_alls(traced) == all_to_alls(eager) and len(all_to_alls(traced)) == 2 * (3 + 5)  # per layer: 3
    # forward, 3 recomputed and 2 backward
    assert {e[6] for e in traced.events if e[0] == "op" and e[2] == "grouped gemm"} == {"graph"}
    h100 = devices.load("h100")
    assert step_time(traced.events, h100, 8).total < 0.9 * step_time(eager.events, h100, 8).total


def test_smaller_experts_run_their_grouped_gemms_slower():
    """The grouped-GEMM rate falls with the experts' smallest dimension as the H100 layer profile
    measured it (moe8's shapes at 731 TFLOP/s, moe64's at 622), and is the profile's own rate at the
    shapes it was measured at."""
    import msgspec
    from minititan.plan import devices
    from minititan.plan.timing import grouped_gemm_rolloff
    h100 = devices.shipped()["h100"]
    assert grouped_gemm_rolloff(devices.GROUPED_REFERENCE_DIM, h100) == pytest.approx(1.0)
    assert grouped_gemm_rolloff(704, h100) == pytest.approx(622 / 731, rel=0.01)
    assert grouped_gemm_rolloff(704, msgspec.structs.replace(h100, grouped_gemm_rolloff_dim=0.0)) == 1.0


def test_a_compiled_float8_dry_run_keeps_the_filtered_output_projection_in_bf16():
    """float8.filter keeps the output projection in bf16: its weight reaches the compiled loss as a
    HighPrecisionWeight, and the compile stand-in traces it as dynamo does, subclass and all (traced
    on a plain stand-in, the loss took the fp8 branch and the plan priced its GEMMs as fp8)."""
    small = ["model.n_layers=2", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
             "model.rope_scaling=false", "training.seq_len=128", "training.local_batch_size=1",
             "training.global_batch_size=1", "compile.enable=true", "float8.enable=true"]
    [run] = dry_runs([(str(CONFIGS / "llama3_8b.toml"), small, 1, 0, (9, 0))])
    gemms = [e for e in run.events if e[0] == "op" and e[2] == "gemm"]
    bf16_flops = sum(e[3] for e in gemms if not e[5])
    assert bf16_flops == 3 * 2 * 128 * 256 * 512  # the output projection's forward, input and weight gradients
    assert any(e[5] for e in gemms)  # the blocks' linears in fp8


FUSED_IN_INDUCTOR = {  # a chain inductor runs as one kernel, writing only the result
    "index_then_sum": (lambda g, i: g[i].unflatten(0, (-1, 2)).sum(1), lambda: (torch.randn(512, 64), torch.randperm(512))),
    "select_scatter": (lambda x, v: (x.select_scatter(v, 0, 3) * 2).sum(0), lambda: (torch.randn(8, 64), torch.randn(64))),
    "searchsorted": (lambda b, v: (torch.searchsorted(b, v) * 3).sum(), lambda: (torch.arange(0, 100, 7),
                                                                                 torch.randint(0, 100, (512,)))),
    "arange_add": (lambda x: (x + torch.arange(x.shape[0])).sum(), lambda: (torch.randn(512),)),
    "swiglu": (lambda a, b: (torch.nn.functional.silu(a) * b).sum(-1), lambda: (torch.randn(64, 64), torch.randn(64, 64))),
}


@pytest.mark.parametrize("name", FUSED_IN_INDUCTOR)
def test_the_fusion_rule_writes_what_inductor_writes(name):
    """The compile stand-in counts an intermediate only if inductor would write it (plan/compiled.py's
    rule). For each chain, inductor's own CPU code is one kernel writing only the result, and the rule
    marks nothing but the result as written."""
    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    from minititan.plan import compiled
    fn, make_args = FUSED_IN_INDUCTOR[name]
    gm = make_fx(fn, decomposition_table=compiled._decompositions())(*make_args())
    output = next(n for n in gm.graph.nodes if n.op == "output")
    written = compiled.materialized(gm) - {n.name for n in output.all_input_nodes}
    assert written == set(), written
    torch._dynamo.reset()
    _, (code, *_) = run_and_get_code(torch.compile(fn, fullgraph=True), *make_args())
    assert len(set(re.findall(r"\bcpp_fused_\w+", code))) == 1, code


# ---------------------------------------------------------------- every parity layout, at scale


def parity_layouts() -> list[list[str]]:
    """Every list of overrides in the parity tests that sets a parallelism key (read from the
    test files, so a new parity test is covered without being listed here)."""
    found = set()
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.name == "test_plan.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List) and node.elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                               for e in node.elts):
                items = [e.value for e in node.elts]
                if any(i.startswith("parallelism.") for i in items) and all("=" in i for i in items):
                    found.add(tuple(i for i in items if i.split("=")[0].split(".")[0] in
                                    ("parallelism", "activation_checkpoint", "float8")))
    return [list(f) for f in sorted(found)]


def at_scale(layout: list[str], world: int) -> list[str] | None:
    """The layout with its data dims grown to fill `world` ranks (dp_shard, or dp_replicate for a
    layout that replicates without sharding), a global batch to match, and the fewest layers and
    a short sequence (the dims, heads and vocabulary stay the config's)."""
    from minititan.core.config import load_config
    p = load_config(None, layout).parallelism
    fixed = p.pp * p.tp * p.cp
    if p.dp_shard == 1 and p.dp_replicate > 1:
        dp_replicate, dp_shard = world // fixed, 1
    else:
        dp_replicate, dp_shard = p.dp_replicate, world // (fixed * p.dp_replicate)
    if dp_replicate * dp_shard * fixed != world:
        return None
    local = p.pp if p.pp_schedule == "interleaved_1f1b" else max(1, p.pp_microbatches)
    layers = p.pp * (p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1) if p.pp > 1 else 1
    degrees = {"dp_shard": dp_shard, "dp_replicate": dp_replicate, "pp": p.pp, "tp": p.tp, "cp": p.cp, "ep": p.ep}
    kept = [o for o in layout if o.split("=")[0] not in [f"parallelism.{d}" for d in degrees]
            + ["parallelism.pp_layers_per_stage"]]
    return kept + [f"parallelism.{d}={n}" for d, n in degrees.items()] + [
                   f"model.n_layers={layers}", f"training.local_batch_size={local}",
                   f"training.global_batch_size={dp_replicate * dp_shard * local}", "training.seq_len=1024",
                   "compile.enable=false"] + (  # the parity tests' AC unless the layout names one
        [] if any(o.startswith("activation_checkpoint.") for o in layout) else ["activation_checkpoint.mode=none"])


def test_every_parity_layout_dry_runs_at_64_and_512_ranks_of_the_shipped_llamas():
    """Shapes, divisibility and layout errors of the real configs, at scale, in seconds: each
    parity layout grown to 64 ranks (on 8B or 70B, taking turns) and to 512 ranks (70B or 405B;
    expert-parallel layouts on moe_4b), rank 0. The layer count and sequence are cut to keep
    this fast; the dims, heads and vocabulary are the configs'. A layout a config cannot take
    (tp 3 of 8 kv heads) is refused by the trainer's own checks, not dry-run."""
    from minititan.core.config import load_config
    from minititan.plan.layouts import refusal
    layouts = parity_layouts()
    assert len(layouts) >= 15, layouts  # the reader found the parity tests' layouts
    jobs, refused, seen = [], [], set()
    for i, layout in enumerate(layouts):
        moe = any(o.startswith("parallelism.ep=") and o != "parallelism.ep=1" for o in layout)
        for world, configs in ((64, ("llama3_8b", "llama3_70b")), (512, ("llama3_70b", "llama3_405b"))):
            scaled = at_scale(layout, world)
            if scaled is None:
                continue
            for name in ("moe_4b",) if moe else configs[i % 2:i % 2 + 1]:  # the configs take turns
                if (name, world, tuple(sorted(scaled))) in seen:
                    continue
                seen.add((name, world, tuple(sorted(scaled))))
                why = refusal(load_config(str(CONFIGS / f"{name}.toml"), scaled), world)
                if why is None:
                    jobs.append((str(CONFIGS / f"{name}.toml"), scaled, world, 0, (9, 0)))
                else:
                    refused.append((name, world, layout, why))
    assert len(jobs) > len(layouts), refused[:5]
    assert {Path(j[0]).stem for j in jobs} >= {"llama3_8b", "llama3_70b", "llama3_405b", "moe_4b"}
    runs = dry_runs(jobs)
    assert all(r.peak_bytes > 0 for r in runs)


# ---------------------------------------------------------------- the estimate


def _estimate(job):
    from minititan.core.config import load_config
    from minititan.plan import devices
    from minititan.plan.estimate import estimate
    path, overrides, world, exact = job
    return estimate(load_config(path, overrides), world, devices.load("h100"), 8, exact=exact)


def test_the_lines_through_fewer_layers_and_micro_batches_give_the_full_runs_numbers():
    """A pipelined layout with 5 layers per stage and 4 micro-batches: estimated from runs of 2 and
    3 layers, 1 and 2 micro-batches, it matches the dry run of the whole thing (memory and time)."""
    overrides = ["model.dim=256", "model.n_heads=8", "model.n_kv_heads=4", "model.n_layers=10", "training.seq_len=128",
                 "training.global_batch_size=16", "training.local_batch_size=2", "training.param_dtype=bfloat16",
                 "parallelism.pp=2", "parallelism.dp_shard=2", "activation_checkpoint.mode=selective"]
    with _CONTEXT.Pool(2) as pool:
        exact, line = pool.map(_estimate, [(None, overrides, 4, True), (None, overrides, 4, False)])
    assert abs(line.peak_bytes - exact.peak_bytes) / exact.peak_bytes < 0.01
    assert abs(line.step.total - exact.step.total) / exact.step.total < 0.01


def test_collectives_cost_what_their_link_and_ring_say():
    from minititan.plan import devices
    from minititan.plan.timing import collective_seconds
    from minititan.plan.trace import Collective
    h100 = devices.load("h100")
    inside = Collective(0, "all_gather", 2**30, tuple(range(8)), "forward")
    across = Collective(1, "all_gather", 2**30, tuple(range(0, 64, 8)), "forward")
    reduce = Collective(2, "all_reduce", 2**30, tuple(range(8)), "forward")
    t_in, t_across = collective_seconds(inside, h100, 8), collective_seconds(across, h100, 8)
    assert t_in == pytest.approx(15e-6 + 7 / 8 * 2**30 / 360e9)
    assert t_across == pytest.approx(30e-6 + 7 / 8 * 2**30 / 45e9)
    assert collective_seconds(reduce, h100, 8) == pytest.approx(15e-6 + 2 * 7 / 8 * 2**30 / 360e9)


def test_a_calibrated_profile_loads_as_a_gpu(tmp_path):
    """What --calibrate writes is what --gpu PATH reads (the measuring itself needs a GPU)."""
    from minititan.plan import devices
    from minititan.plan.calibrate import _nearest_profile, write_profile
    path = tmp_path / "mine.toml"
    write_profile(str(path), "NVIDIA H100 80GB HBM3", {"gemm_tflops": 700.0, "optimizer_efficiency":
                                                       {"fused": 0.7, "compiled": 0.99, "foreach": 0.3}},
                  _nearest_profile("NVIDIA H100 80GB HBM3"))
    device = devices.load(str(path))
    assert device.gemm_tflops == 700.0 and device.name == "nvidia_h100_80gb_hbm3"
    assert device.nvlink_gbs == devices.load("h100").nvlink_gbs
    # a GPU without grouped GEMMs measures no grouped rate: on a base without one the key is left
    # out (TOML has no null), and the profile prices grouped GEMMs as dense ones
    import msgspec
    base = msgspec.structs.replace(_nearest_profile("NVIDIA A100"), grouped_gemm_tflops=None)
    write_profile(str(path), "NVIDIA A100-SXM4-80GB", {"gemm_tflops": 280.0}, base)
    assert "grouped_gemm_tflops" not in path.read_text() and devices.load(str(path)).grouped_gemm_tflops is None


def test_pipeline_bubble_is_the_schedules_idle_time():
    from minititan.plan.timing import pipeline_bubble
    from minititan.schedules.simulate import textbook_bubble
    # 1F1B with F = 1, B = 2: idle (p-1)(F+B) = 3 * 3 per pipeline of 8 microbatches
    assert pipeline_bubble("1f1b", 4, 8, 1, 1.0, 2.0) == pytest.approx(9.0)
    b = textbook_bubble("1f1b", 4, 8)
    assert pipeline_bubble("1f1b", 4, 8, 1, 1.0, 2.0) / (8 * 3 + 9.0) == pytest.approx(b)


# ---------------------------------------------------------------- the commands


def _cli_in_a_fresh_process(args):
    result = harness.run_cli(*args)
    return result.exit_code, result.stdout if "--json" in args else result.output


def cli(*args):
    with _CONTEXT.Pool(1) as pool:
        return pool.apply(_cli_in_a_fresh_process, (args,))


SMALL = ["--model.dim=128", "--model.n_heads=4", "--model.n_kv_heads=4", "--model.n_layers=4",
         "--training.seq_len=128", "--training.global_batch_size=8", "--training.local_batch_size=2",
         "--training.param_dtype=bfloat16"]


def test_plan_one_layout_prints_its_breakdown_and_json():
    code, out = cli("plan", "--gpus", 4, "--gpu", "h200", "--layout", "dp_shard=2,tp=2,ac=selective,batch=2", *SMALL)
    assert code == 0, out
    for words in ("memory of the worst rank", "fp32 masters", "optimizer moments", "activations", "tokens/s per GPU",
                  "tp", "fsdp all-gather"):
        assert words in out, out
    code, out = cli("plan", "--gpus", 4, "--layout", "pp=2,dp_shard=2", "--json", *SMALL)
    assert code == 0, out
    result = json.loads(out)
    assert result["fits"] and result["memory_gib"]["worst_rank"] in (0, 2) and result["step_ms"]["bubble"] > 0


def test_plan_says_which_functions_it_priced_as_eager():
    """Under compile, a block the dry run cannot trace (context parallel's ring attention) is priced
    as eager and named as such; an expert-parallel MoE layer with the exact exchange under activation
    checkpointing runs eagerly in the real step too (dynamo cannot break the graph at its host read
    inside checkpoint), and is named as priced as it runs; with the capped exchange it compiles and
    nothing is said. The ranked table stars such layouts' tokens/s."""
    moe = [*SMALL, "--model.name=moe", "--model.n_experts=4", "--model.top_k=2", "--compile.enable=true"]
    code, out = cli("plan", "--gpus", 2, "--layout", "cp=2", *SMALL, "--compile.enable=true")
    assert code == 0 and "priced as eager (the dry run could not trace them" in out and "attention_block" in out, out
    code, out = cli("plan", "--gpus", 2, "--layout", "dp_shard=2,ep=2,ac=selective", "--json", *moe)
    assert [why.split(" (")[0] for why in json.loads(out)["priced_as_eager"]] == ["moe_layer"], out
    assert "eager in the real step too" in json.loads(out)["priced_as_eager"][0], out
    code, out = cli("plan", "--gpus", 2, "--layout", "dp_shard=2,ep=2,ac=selective", "--parallelism.ep_capacity_factor=2",
                    *moe)
    assert code == 0 and "priced as eager" not in out, out
    code, out = cli("plan", "--gpus", 2, "--workers", 1, "--parallelism.pp=1", "--activation_checkpoint.mode=selective",
                    *moe)  # the ranked table marks such layouts' tokens/s
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+ ", line)]
    assert code == 0 and "(*: part of the step runs eagerly under compile and is priced so" in out, out
    assert all(("*" in row) == (" ep 2 " in row) for row in rows), out


def test_an_unset_global_batch_is_derived_as_train_derives_it():
    """training.global_batch_size = 0 (the built-in config's): local batch x data-parallel ranks, in
    `plan --layout`, `train --dry-run` and the search's fixed batch (a division by zero before)."""
    code, out = cli("plan", "--gpus", 4, "--layout", "dp_shard=4")
    assert code == 0 and "global batch 64 x 128 tokens" in out, out  # the debug config's local batch 16 x 4
    code, out = cli("train", "--dry-run", "--nproc", 2)
    assert code == 0 and "dry run ok: 2 ranks" in out, out
    from minititan.core.config import load_config
    from minititan.plan.layouts import make
    cfg = load_config(None, [])
    assert cfg.training.global_batch_size == 0
    assert make(cfg, 4, {"parallelism.dp_shard": 2, "parallelism.dp_replicate": 2}, {}, {}).cfg.training.global_batch_size == 64


def test_plan_refuses_a_layout_with_trains_line():
    bad = ["--layout", "tp=3", *SMALL]
    code, out = cli("plan", "--gpus", 3, *bad)
    line = out.strip()
    assert code == 2 and "\n" not in line and line.startswith("error:"), out
    code, train_out = cli("train", "--dry-run", "--nproc", 3, "--parallelism.tp=3", *SMALL)
    assert code == 2 and train_out.strip() == line


def test_plan_bad_input_is_one_line(tmp_path):
    """A bad --layout value, --gpu file, count or --calibrate path: a UserError naming the fix."""
    from minititan.core.config import UserError, load_config
    from minititan.plan import devices
    from minititan.plan.calibrate import calibrate
    from minititan.plan.command import run_plan
    cfg = load_config(None, [o[2:] for o in SMALL])
    for layout, says in (("tp=abc", "parallelism.tp"), ("dp_shard=4,ac=bogus", "valid choices: none, full"),
                         ("dp_shard=4,batch=x", "training.local_batch_size")):
        with pytest.raises(UserError, match=says):
            run_plan(cfg, set(), 4, "h100", 8, layout, False, 10, 1)
    for flag in ("--gpus", "--gpus-per-node", "--top", "--workers"):  # a count below 1: refused by the command line
        args = ["plan", "--gpus", "4", flag, "0"] if flag != "--gpus" else ["plan", "--gpus", "0"]
        assert_one_line_error(harness.run_cli(*args), [flag, "not in the range"])
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    for name in ("empty.toml", "binary.toml"):
        with pytest.raises(UserError, match="no profile in it"):
            devices.load(str(tmp_path / name))
    shipped = Path(devices.__file__).with_name("devices.toml").read_text()
    (tmp_path / "zero.toml").write_text(shipped.replace("gemm_tflops = ", "gemm_tflops = 0 #", 1))
    with pytest.raises(UserError, match="gemm_tflops is 0"):
        devices.load(str(tmp_path / "zero.toml"))
    for out in (tmp_path / "no_such_folder" / "gpu.toml", tmp_path / "gpu.txt"):
        with pytest.raises(UserError, match="name a .toml file in an existing folder"):
            calibrate(str(out))


def test_plan_ranks_the_layouts_that_fit():
    code, out = cli("plan", "--gpus", 4, "--workers", 1, "--json", "--parallelism.pp=1",
                    "--activation_checkpoint.mode=none", *SMALL)
    assert code == 0, out
    result = json.loads(out)
    speeds = [r["tokens_per_sec_per_device"] for r in result["ranked"]]
    assert len(speeds) >= 3 and speeds == sorted(speeds, reverse=True)
    assert all(r["settings"]["parallelism.pp"] == 1 for r in result["ranked"])  # a knob set on the command line stays
    assert all(r["fits"] for r in result["ranked"])


def test_plan_on_a_pool_of_workers_ranks_what_one_process_ranks():
    """The search's worker pool (each layout estimated as its dry runs come back, in any order; a
    mesh's next batch size once the last fits) ranks the same layouts, with the same numbers, as
    the search done in one process. Run as a command: a pool cannot start inside a test's pool."""
    args = [sys.executable, "-m", "minititan.cli", "plan", "--gpus", "2", "--json", "--parallelism.pp=1",
            "--activation_checkpoint.mode=none", *SMALL]
    outs = [subprocess.run(args + ["--workers", n], capture_output=True, text=True, timeout=300) for n in ("1", "2")]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    one, pool = (json.loads(r.stdout) for r in outs)
    assert len(pool["ranked"]) >= 3 and pool["ranked"] == one["ranked"] and pool["dry_runs"] == one["dry_runs"]


def _clis_in_a_fresh_process(arg_lists):
    return [_cli_in_a_fresh_process(args) for args in arg_lists]


def test_plan_keeps_a_pinned_selective_every_nth_block():
    """--activation_checkpoint.selective=2 on the command line stays, as the other knobs do: every
    layout ranked checkpoints every 2nd block; without it, selective AC is searched per op."""
    pinned = ("plan", "--gpus", 2, "--workers", 1, "--json", "--parallelism.pp=1", "--parallelism.tp=1",
              "--activation_checkpoint.mode=selective", *SMALL)
    with _CONTEXT.Pool(1) as pool:  # one fresh process for both (dry runs need one without a process group)
        outs = pool.apply(_clis_in_a_fresh_process, ([(*pinned, "--activation_checkpoint.selective=2"), pinned],))
    for (code, out), every in zip(outs, ("2", "op")):
        assert code == 0, out
        ranked = json.loads(out)["ranked"]
        assert ranked and all(r["settings"]["activation_checkpoint.mode"] == "selective" for r in ranked), out
        assert {r["settings"]["activation_checkpoint.selective"] for r in ranked} == {every}, out


def test_train_dry_run_of_the_405b_job_on_512_ranks():
    code, out = cli("train", "-c", CONFIGS / "llama3_405b.toml", "--dry-run", "--nproc", 512,
                    "--model.n_layers=8", "--parallelism.pp=4", "--parallelism.tp=8", "--parallelism.dp_shard=16",
                    "--training.global_batch_size=64", "--training.local_batch_size=4", "--compile.enable=false")
    assert code == 0, out
    assert "dry run ok: 512 ranks" in out and "rank 384 of 512" in out, out


def _leave_a_mark_and_die(path: str):
    """Unpickled by a pool worker as it takes its job: the worker dies holding the job, as one
    killed for memory mid-dry-run does."""
    import os
    Path(path).touch()
    os._exit(3)


class _KillsItsWorker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _leave_a_mark_and_die, (self.path,)


def test_a_dry_run_that_never_comes_back_ends_the_search_with_one_line(tmp_path):
    """A pool worker killed during its dry run (out of memory, a signal) never answers, and the
    pool does not say so (it starts a new worker; the task is lost): the search stops after a
    wait with one line instead of waiting forever, and its advice (--workers 1, which dry-runs in
    this process: test_plan_on_a_pool_of_workers_ranks_what_one_process_ranks) works."""
    import time
    from minititan.core.config import UserError
    from minititan.plan import devices
    from minititan.plan.layouts import DryRunPool
    pool = DryRunPool(2, devices.load("h100"), 8, workers=2)
    try:
        mark = tmp_path / "taken"
        pool._submit("job", (_KillsItsWorker(str(mark)), 2, 0, (9, 0)))
        deadline = time.monotonic() + 120  # spawned workers import torch first
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists(), "no worker took the job"
        with pytest.raises(UserError, match="no dry run came back in 2 s.*--workers 1") as e:
            pool._next_result(timeout=2)
        assert "\n" not in str(e.value)
    finally:
        pool.close()


def test_the_search_tries_full_ac_keeping_the_attention_at_long_sequences():
    """From plan's long-sequence length on, the search adds selective = "attention" to the AC modes it
    tries (full AC's recompute is mostly the attention there); it prices it and names it sel-attention."""
    from minititan.plan.layouts import ac_choice, settings_of
    mesh = {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 1, "ep": 1}
    s = settings_of(mesh, "attention", 1, "1f1b")
    assert (s["activation_checkpoint.mode"], s["activation_checkpoint.selective"], ac_choice(s)) == (
        "selective", "attention", "attention")
    assert ac_choice(settings_of(mesh, "selective", 1, "1f1b")) == "selective"
    # (dp_shard pinned where the search also tries cp 2 on 2 GPUs: it had divided by a dp_replicate of 0)
    code, out = cli("plan", "--gpus", 2, "--workers", 1, "--json", "--parallelism.dp_shard=2", "--model.dim=128",
                    "--model.n_heads=4", "--model.n_kv_heads=4", "--model.n_layers=4", "--training.seq_len=16384",
                    "--model.max_seq_len=16384", "--training.global_batch_size=2", "--training.param_dtype=bfloat16")
    assert code == 0, out
    tried = {(r["settings"]["activation_checkpoint.mode"], r["settings"].get("activation_checkpoint.selective"))
             for r in json.loads(out)["ranked"]}
    assert ("selective", "attention") in tried, tried

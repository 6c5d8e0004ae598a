"""Validation, the profiler trace, the communication trace, deterministic mode and comm timeouts."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist

from minititan.collectives import comm_trace, ring_attention, sequence_parallel
from minititan.core import model
from minititan.core.config import ConfigError, UserError, load_config
from minititan.core.data import TokenSource
from minititan.core.determinism import make_deterministic
from minititan.core.validation import held_out
from tests.distributed import run_ranks
from tests.harness import TINY, train_run

FP32 = 4  # bytes per element
SHORT = ["training.steps=3", "checkpoint.interval=1000"]


# ---------------------------------------------------------------- validation


def hand_val_loss(params, cfg, steps: int) -> float:
    """The held-out loss by hand: one process, the full params, the same batches."""
    data, t = TokenSource("shakespeare", cfg.model.vocab_size), cfg.training
    total = 0.0
    for i in range(1, steps + 1):
        x, y = data.batch(t.seed, i, t.global_batch_size, t.seq_len, split="val")
        total += model.loss_sum(params, x, y, cfg.model).item()
    return total / (steps * t.global_batch_size * t.seq_len)


VALIDATE = ["validation.enable=true", "validation.freq=2", "validation.steps=2"]


def check_validation(rows, params, overrides):
    assert [("val_loss" in r) for r in rows] == [False, True, True]  # every freq steps and at the end
    cfg = load_config(None, TINY + overrides)
    want = hand_val_loss(params, cfg, steps=2)  # params after the last step, which the last evaluation saw
    assert abs(rows[-1]["val_loss"] - want) / want < 1e-5
    assert math.isclose(rows[-1]["val_ppl"], math.exp(rows[-1]["val_loss"]))


@pytest.mark.parametrize("world, layout", [(1, []), (2, ["parallelism.cp=2"]), (2, ["parallelism.pp=2"])],
                         ids=["one-rank", "cp2", "pp2"])  # FSDP: test_comm_trace_dp_shard_with_validation
def test_validation_loss_is_the_hand_computed_loss(tmp_path, world, layout):
    overrides = SHORT + VALIDATE + layout
    rows, params = train_run(tmp_path, world, overrides)
    check_validation(rows, params, overrides)


def test_validation_in_metrics_jsonl_and_profiler_trace_of_chosen_steps(tmp_path):
    """One run for both: val_loss reaches metrics.jsonl; the trace holds steps 2-3, nothing else."""
    train_run(tmp_path, 1, ["training.steps=4", "metrics.jsonl=true", "validation.enable=true", "validation.freq=4",
                            "validation.steps=1", "profiling.enable=true", "profiling.start_step=2",
                            "profiling.steps=2"], name="run")
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[-1]["step"] == 4 and jsonl[-1]["val_loss"] > 0 and "val_ppl" in jsonl[-1]
    traces = list((tmp_path / "run" / "profiling").iterdir())
    assert [p.name for p in traces] == ["rank0_steps2-3.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    assert sum(e.get("name") == "aten::mm" for e in events) > 10  # the steps' work is in it


def test_validation_needs_a_held_out_split(tmp_path):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(1000, dtype=np.uint16) % 256)
    cfg = load_config(None, [f"data.dataset={tokens}", "validation.enable=true"])
    with pytest.raises(UserError, match="validation.dataset"):
        held_out(cfg, TokenSource(str(tokens), 256))


# ---------------------------------------------------------------- the communication trace


def last_step_calls(tmp_path, name="run") -> Counter:
    trace = json.loads((tmp_path / name / "comm_trace" / "rank0.json").read_text())
    return Counter((c["group"], c["op"], c["bytes"]) for c in trace["last_step"])


def test_comm_trace_dp_replicate(tmp_path):
    train_run(tmp_path, 2, SHORT + ["parallelism.dp_replicate=2", "comm.trace=true", "checkpoint.enable=false"])
    cfg = load_config(None, TINY)
    assert last_step_calls(tmp_path) == Counter({
        ("dp_replicate", "all_reduce", model.num_params(cfg.model) * FP32): 1,  # the grads: one 25 MB bucket
        ("dp_replicate", "all_reduce", FP32): 1,  # the logged loss
        ("world", "all_reduce", 2 * FP32): 1})  # the grad norm with the stop vote (core/guard.py)


def test_comm_trace_tp(tmp_path):
    train_run(tmp_path, 2, SHORT + ["parallelism.tp=2", "comm.trace=true", "checkpoint.enable=false"])
    m, t = load_config(None, TINY).model, load_config(None, TINY).training
    n_micro, tokens = t.global_batch_size // t.local_batch_size, t.local_batch_size * t.seq_len
    activation = tokens * m.dim * FP32
    # per micro-batch: forward, the partial sums of the embedding and of every block; backward, the
    # input gradient of every block and of the output head; the vocab-parallel loss: the max, then
    # sum-exp and target logit stacked
    per_micro = Counter({("tp", "all_reduce", activation): 1 + 2 * m.n_layers + 2 * m.n_layers + 1,
                         ("tp", "all_reduce", tokens * FP32): 1, ("tp", "all_reduce", 2 * tokens * FP32): 1})
    want = Counter({k: v * n_micro for k, v in per_micro.items()}) + Counter({("world", "all_reduce", 2 * FP32): 1})
    assert last_step_calls(tmp_path) == want


def unit_bytes(names, shapes, world: int) -> int:
    """A unit's flat FSDP buffer: each parameter 16-element aligned, padded to split evenly."""
    end = 0
    for n in names:
        end = -(-(end + math.prod(shapes[n])) // 16) * 16
    return -(-end // world) * world * FP32


def test_comm_trace_dp_shard_with_validation(tmp_path):
    """FSDP's gathers and reductions, exactly; the last step also validates (forward only) under FSDP."""
    overrides = SHORT + VALIDATE + ["parallelism.dp_shard=2", "comm.trace=true"]
    rows, params = train_run(tmp_path, 2, overrides)
    check_validation(rows, params, overrides)
    cfg = load_config(None, TINY)
    t, shapes, units = cfg.training, model.param_shapes(cfg.model), model.units(cfg.model)
    n_micro = t.global_batch_size // 2 // t.local_batch_size
    want = Counter()
    for unit, names in units.items():
        size = unit_bytes(names, shapes, 2)
        regathered = unit.startswith("layers.")  # backward gathers the blocks again; not the embedding
        # (its backward needs no weight) nor the output head (still gathered when backward starts)
        validation = 2 * n_micro  # validation.steps batches, forward only: each unit once
        want[("dp_shard", "all_gather", size)] += n_micro * (2 if regathered else 1) + validation
        want[("dp_shard", "reduce_scatter", size)] += n_micro
    calls = last_step_calls(tmp_path)
    assert Counter({k: v for k, v in calls.items() if k[1] in ("all_gather", "reduce_scatter")}) == want


def _trace_ops(rank, world):
    """Module aliases, async works and batched P2P are traced; close() puts everything back."""
    originals = dist.all_reduce, sequence_parallel.all_gather_single, dist.P2POp
    group = dist.new_group([0, 1])
    tracer = comm_trace.CommTracer({group: "ring"}, "cpu")
    x = torch.ones(8)
    dist.all_reduce(x, group=group)
    out, work = sequence_parallel.all_gather_stacked(torch.ones(3, 2), group, async_op=True)
    work.wait()
    received, works = ring_attention.ring_shift(torch.ones(5, dtype=torch.float64), group)
    ring_attention.wait(works)
    tracer.end_step()
    tracer.close()
    restored = (dist.all_reduce, sequence_parallel.all_gather_single, dist.P2POp) == originals
    return [r.as_dict() for r in tracer.last_step], restored, tracer.table()


def test_comm_tracer_records_aliases_async_and_p2p():
    calls, restored, table = run_ranks(2, _trace_ops)[0]
    assert [(c["op"], c["group"], c["bytes"], c["dtype"]) for c in calls] == [
        ("all_reduce", "ring", 8 * 4, "float32"), ("all_gather", "ring", 2 * 3 * 2 * 4, "float32"),
        ("batch_isend_irecv", "ring", 2 * 5 * 8, "float64")]
    assert all(c["seconds"] is not None and c["seconds"] >= 0 for c in calls)
    assert restored and "batch_isend_irecv" in table


# ---------------------------------------------------------------- config: deterministic mode, timeouts


def test_debug_keys_validate_and_default_off():
    cfg = load_config()
    assert not (cfg.validation.enable or cfg.profiling.enable or cfg.profiling.memory_snapshot or cfg.comm.trace
                or cfg.training.deterministic)
    for bad in ("validation.freq=0", "profiling.steps=0", "comm.timeout_s=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_deterministic_on_cpu_only_notes(capsys):
    make_deterministic(torch.device("cpu"), 0)
    assert "already repeat" in capsys.readouterr().out and not torch.are_deterministic_algorithms_enabled()


def _group_timeout(rank, world):
    import time
    from minititan.collectives.mesh import Mesh
    mesh = Mesh({"dp_replicate": 2}, rank, timeout_s=1.0)
    group = mesh.group("dp_replicate")
    if rank == 1:
        time.sleep(6.0)  # alive but never joins the all-reduce (long enough that a loaded CI core still times out first)
        return None
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as e:
        return str(e), time.perf_counter() - start
    return "no error", time.perf_counter() - start


def test_comm_timeout_applies_to_mesh_groups():
    message, seconds = run_ranks(2, _group_timeout, timeout=60)[0]
    assert "timed out" in message.lower() and seconds < 5.0

"""Step time from a dry run's trace and a device profile: a model with few, visible constants.

Each recorded op costs, on the device (constants from plan/devices.toml):
  GEMM          flops / gemm_tflops (gemm_fp8_tflops for _scaled_mm), or its bytes / hbm_gbs
                if that is longer (skinny GEMMs are memory-bound), + kernel_us; a grouped GEMM
                (the MoE experts) at grouped_gemm_tflops (fp8: scaled by the same fraction), slower
                for smaller experts: x m / (m + grouped_gemm_rolloff_dim), m the smallest per-group
                dimension, relative to that factor at the profile's reference shapes (devices.py)
  attention     flops / attention_tflops (causal flash attention, plan/trace.py's count) + kernel_us
  element-wise  bytes read and written / (hbm_gbs x elementwise_efficiency) + kernel_us; inside a
                compiled graph only what a fused kernel reads from memory and writes back counts
                (plan/compiled.py), with a kernel_us per written output
  optimizer     its bytes / (hbm_gbs x optimizer_efficiency of the AdamW implementation)
and the host must have issued it: eager ops cost host_op_us each on the host (a compiled graph's
kernels compiled_host_fraction of that), and the device cannot start an op the host has not
reached (small models are host-bound).

A collective costs latency + bytes on the wire / bandwidth of the link it crosses (nvlink_gbs
when all its ranks are on one node of gpus_per_node, network_gbs otherwise), with the ring
factor of its kind ((n-1)/n of the data for all-gather, reduce-scatter and all-to-all, twice
that for all-reduce). It runs on its group's stream from where the code issued it, after the
compute issued before it and the group's earlier collectives; the compute stream waits for it
where the code waits (plan/trace.py records both). The time it makes the compute stream wait is
its exposed time; compute that runs beside a collective is comm_compute_slowdown slower. This is
the overlap the code has, no more: an FSDP all-gather prefetched one unit ahead hides behind
that unit's compute if it is short enough; a tensor-parallel all-reduce hides behind nothing.

Pipeline parallel: a rank's trace runs its microbatches back to back. The idle time the
schedule adds (fill and drain) comes from schedules/simulate.py, run with the measured costs of
one forward and one backward of a stage (the slowest of the ranks dry-run).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from minititan.plan.devices import GROUPED_REFERENCE_DIM, Device
from minititan.plan.trace import Collective

COMM_KINDS = ("fsdp all-gather", "fsdp reduce-scatter", "dp all-reduce", "tp", "cp", "ep all-to-all", "pp send/recv",
              "other")


@dataclasses.dataclass
class StepTime:
    """One rank's step, in seconds."""
    total: float
    compute: dict[str, float]  # gemm, attention, elementwise, optimizer (device time)
    exposed: dict[str, float]  # per COMM_KINDS: time the compute stream waited for it
    comm: dict[str, float]  # per COMM_KINDS: time on the wire (exposed or hidden)
    host_wait: float  # time the device waited for the host (eager op overhead)
    bubble: float = 0.0  # pipeline fill and drain
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # forward / backward / step: wall time in each


def comm_kind(c: Collective) -> str:
    """The parallelism a collective serves, named for the report."""
    dims = set(c.dims.split("+")) if c.dims else set()
    if c.kind == "all_to_all":
        return "ep all-to-all"
    if c.kind in ("send", "recv"):
        return "pp send/recv" if "pp" in dims else "cp"
    if c.kind in ("all_gather", "reduce_scatter") and c.flat and c.dims != "tp":
        return "fsdp all-gather" if c.kind == "all_gather" else "fsdp reduce-scatter"
    if c.nbytes < 65536:
        return "other"  # losses, norms, load counts, fp8 scales
    if dims == {"tp"}:
        return "tp"
    if c.kind == "all_reduce" and (dims <= {"dp_replicate", "dp_shard", "cp", "tp", "expert_dp"}):
        return "dp all-reduce"
    if dims == {"cp"}:
        return "cp"
    return "other"


def collective_seconds(c: Collective, device: Device, gpus_per_node: int) -> float:
    n = len(c.ranks)
    if n <= 1:
        return 0.0
    one_node = len({r // gpus_per_node for r in c.ranks}) == 1
    gbs, latency = ((device.nvlink_gbs, device.nvlink_latency_us) if one_node else
                    (device.network_gbs, device.network_latency_us))
    share = {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n,
             "all_reduce": 2 * (n - 1) / n}.get(c.kind, 1.0)
    return latency * 1e-6 + share * c.nbytes / (gbs * 1e9)


def op_seconds(kind: str, flops: float, nbytes: float, fp8: bool, device: Device, where: str,
               optimizer: str = "fused", size: int = 0) -> float:
    """Device time of one op (where: eager, or in a compiled graph, fused into the kernel after
    it; optimizer: the AdamW implementation, whose kernels reach different fractions of the copy
    bandwidth; size: a grouped GEMM's smallest per-group dimension)."""
    hbm = device.hbm_gbs * 1e9
    if kind in ("gemm", "grouped gemm"):
        rate = (device.gemm_fp8_tflops if fp8 else device.gemm_tflops) * 1e12
        if kind == "grouped gemm" and device.grouped_gemm_tflops:  # many small GEMMs in one kernel
            rate *= device.grouped_gemm_tflops / device.gemm_tflops * grouped_gemm_rolloff(size, device)
        return max(flops / rate, nbytes / hbm) + device.kernel_us * 1e-6
    if kind == "attention":
        return flops / (device.attention_tflops * 1e12) + device.kernel_us * 1e-6
    if kind == "optimizer":
        return nbytes / (hbm * device.optimizer_efficiency[optimizer]) + device.kernel_us * 1e-6
    kernel = 0.0 if where == "fused" else device.kernel_us * 1e-6
    return nbytes / (hbm * device.elementwise_efficiency) + kernel


def grouped_gemm_rolloff(size: int, device: Device) -> float:
    """A grouped GEMM's rate at smallest per-group dimension `size`, relative to grouped_gemm_tflops
    (measured at GROUPED_REFERENCE_DIM): m / (m + d) against the same at the reference. Tiles
    partly empty and short main loops cost a small expert a larger share of its time."""
    d = device.grouped_gemm_rolloff_dim
    if not d or not size:
        return 1.0
    return size / (size + d) / (GROUPED_REFERENCE_DIM / (GROUPED_REFERENCE_DIM + d))


def step_time(events: list[tuple], device: Device, gpus_per_node: int, optimizer: str = "fused") -> StepTime:
    """Replay a rank's trace on the device: a compute stream, one stream per process group, the host."""
    compute, exposed, comm, phases = Counter(), Counter(), Counter(), Counter()
    t = host = host_wait = 0.0
    phase = "forward"
    stream_free: dict[tuple[int, ...], float] = {}
    pending: dict[int, tuple[float, str]] = {}  # collective id -> (end, kind)
    busy_until = 0.0  # the last end of a collective in flight (compute beside it is slower)
    host_op = {"eager": device.host_op_us * 1e-6, "graph": device.host_op_us * 1e-6 * device.compiled_host_fraction,
               "fused": 0.0}
    for event in events:
        if event[0] == "op":
            _, phase, kind, flops, nbytes, fp8, where, size = event
            host += host_op[where]
            before = t
            if host > t:
                host_wait += host - t
                t = host
            seconds = op_seconds(kind, flops, nbytes, fp8, device, where, optimizer, size)
            if t < busy_until:
                seconds *= 1 + device.comm_compute_slowdown
            t += seconds
            compute[kind] += seconds
            phases[phase] += t - before
        elif event[0] == "issue":
            c = event[1]
            host += host_op["eager"]
            seconds = collective_seconds(c, device, gpus_per_node)
            start = max(t, host, stream_free.get(c.ranks, 0.0))
            end = start + seconds
            stream_free[c.ranks] = end
            kind = comm_kind(c)
            pending[c.id] = (end, kind)
            comm[kind] += seconds
            busy_until = max(busy_until, end)
        else:  # wait
            end, kind = pending.pop(event[1], (0.0, "other"))
            if end > t:
                exposed[kind] += end - t
                phases[phase] += end - t
                t = end
    for end, kind in pending.values():  # never waited for (sends): the step ends when they do
        if end > t:
            exposed[kind] += end - t
            t = end
    return StepTime(t, dict(compute), dict(exposed), dict(comm), host_wait, phases=dict(phases))


def pipeline_bubble(schedule: str, pp: int, microbatches: int, virtual: int, forward: float, backward: float) -> float:
    """Idle time a pipeline adds per pipeline pass, from schedules/simulate.py with the measured
    cost of one forward and one backward of a stage (zero bubble: input and weight halves equal)."""
    from minititan.schedules.simulate import simulate_schedule
    if pp <= 1 or forward <= 0:
        return 0.0
    unit = forward  # simulate's time unit
    costs = {"F": 1.0, "B": backward / unit, "I": backward / unit / 2, "W": backward / unit / 2}
    timeline = simulate_schedule(schedule, pp, microbatches, virtual, costs)
    busy = microbatches * virtual * (1.0 + backward / unit)
    return (timeline.makespan - busy) * unit

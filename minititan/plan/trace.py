"""What one rank's step does, in program order: its compute ops and its collectives.

The dry run passes every op to `StepTrace.on_op`. Compute ops are recorded with what the time
model needs and nothing else: their kind (GEMM, attention, element-wise, optimizer), FLOPs
(matmuls and attention) and the bytes they read and write. A collective is recorded where it
is issued, with its kind, bytes and the ranks of its group, and again where the code waits for
it (`on_wait`, from the FakeWork handle), because that is where the compute stream waits on a
GPU. So the trace holds the overlap the code really has: a prefetched FSDP all-gather is issued
one unit before it is waited for; a tensor-parallel all-reduce is waited for at once.

    events  [("op", phase, kind, flops, bytes, gemm_shape), ("issue", Collective), ("wait", id), ...]

phase is "forward", "backward" (an autograd node is running: includes activation recompute)
or "step" (after the gradients are complete: grad norm, clipping, the optimizer).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


@dataclasses.dataclass
class Collective:
    id: int
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all | send | recv
    nbytes: int  # what this rank sends or receives: the gathered output, the scattered input, the tensor
    ranks: tuple[int, ...]  # global ranks of its group
    phase: str
    what: str = ""  # which parallelism issued it, named by its group (StepTrace.name_groups)


COLLECTIVE_KINDS = {
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce", "alltoall_base_": "all_to_all", "alltoall_": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "broadcast_": "broadcast",
}

GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_mm.default}
ATTENTION_FORWARD = {aten._scaled_dot_product_flash_attention.default,
                     aten._scaled_dot_product_cudnn_attention.default,
                     aten._scaled_dot_product_efficient_attention.default,
                     aten._scaled_dot_product_flash_attention_for_cpu.default}
ATTENTION_BACKWARD = {aten._scaled_dot_product_flash_attention_backward.default,
                      aten._scaled_dot_product_cudnn_attention_backward.default,
                      aten._scaled_dot_product_efficient_attention_backward.default,
                      aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
        aten.detach.default, aten.alias.default, aten.lift_fresh.default, aten._local_scalar_dense.default,
        aten.set_.source_Storage_storage_offset, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default}


def _optional(name: str):
    packet = getattr(aten, name, None)
    return packet.default if packet is not None else None


GROUPED_GEMMS = {op for op in (_optional("_grouped_mm"), _optional("_scaled_grouped_mm")) if op is not None}


class StepTrace:
    def __init__(self):
        self.events: list[tuple] = []
        self.collectives: dict[int, Collective] = {}
        self.phase = "forward"
        self._work_ids: dict[int, tuple[int, object]] = {}  # id(work handle) -> (collective id, handle)
        self._group_names: dict[tuple[int, ...], str] = {}

    def name_groups(self, names: dict[tuple[int, ...], str]) -> None:
        """Ranks of a group -> the parallelism it serves ("fsdp", "tp", "cp", "pp", "ep", "dp" ...)."""
        self._group_names = names

    # ------------------------------------------------------------ compute

    def current_phase(self) -> str:
        return "backward" if torch._C._current_autograd_node() is not None else self.phase

    def on_op(self, func, args, kwargs, out) -> None:
        if func.namespace == "c10d":
            return self._issue(func, args, out)
        if func in FREE or func.is_view or func.namespace not in ("aten", "prims"):
            return
        phase = self.current_phase()
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        if func in GEMMS or func in GROUPED_GEMMS or func.overloadpacket is aten.mm:
            flops, shape = _gemm(func, args, kwargs, out)
            self.events.append(("op", phase, "gemm", flops, nbytes, shape))
        elif func in ATTENTION_FORWARD or func in ATTENTION_BACKWARD:
            flops = _attention_flops(func, args, kwargs)
            self.events.append(("op", phase, "attention", flops, nbytes, None))
        elif func.overloadpacket in (aten._fused_adamw_, aten._fused_adam_) or (
                phase == "step" and func.name().startswith("aten::_foreach")):
            self.events.append(("op", phase, "optimizer", 0.0, nbytes, None))
        elif nbytes:
            self.events.append(("op", phase, "elementwise", 0.0, nbytes, None))

    # ------------------------------------------------------------ communication

    def _issue(self, func, args, out) -> None:
        name = func.overloadpacket.__name__
        kind = COLLECTIVE_KINDS.get(name)
        if kind is None:
            return
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        groups = [a for a in tree_flatten(args)[0] if isinstance(a, torch.ScriptObject)
                  and "ProcessGroup" in str(a._type())]
        ranks = tuple(dist.get_process_group_ranks(ProcessGroup.unbox(groups[0]))) if groups else ()
        if kind == "all_gather":
            nbytes = _nbytes(tensors[0])  # the gathered output
        elif kind in ("reduce_scatter", "all_to_all"):
            nbytes = max(_nbytes(tensors[0]), _nbytes(tensors[1]))
        else:
            nbytes = sum(_nbytes(t) for t in tensors)
        c = Collective(len(self.collectives), kind, nbytes, ranks, self.current_phase(),
                       self._group_names.get(ranks, "other"))
        self.collectives[c.id] = c
        self.events.append(("issue", c))
        work = out[1] if isinstance(out, tuple) and len(out) == 2 else out
        if isinstance(work, torch.ScriptObject):
            handle = torch._C._distributed_c10d.Work.unbox(work)
            self._work_ids[id(handle)] = (c.id, handle)  # the handle is kept: its id stays unique

    def on_wait(self, handle) -> None:
        entry = self._work_ids.pop(id(handle), None)
        if entry is not None:
            self.events.append(("wait", entry[0]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gemm(func, args, kwargs, out) -> tuple[float, tuple[int, int, int]]:
    """FLOPs and (m, n, k) of a matmul; a batched or grouped one as one (m summed) GEMM."""
    a, b = args[0], args[1] if func is not aten.addmm.default else args[2]
    if func is aten.addmm.default:
        a = args[1]
    if func in GROUPED_GEMMS:  # a [rows, k] against w [groups, k, n]: each row meets one group
        m, k = a.shape[-2], a.shape[-1]
        n = b.shape[-1]
        return 2.0 * m * n * k, (m, n, k)
    if func in flop_registry:
        flops = float(flop_registry[func.overloadpacket](*args, out_val=out, **kwargs))
    else:
        flops = 2.0 * a.shape[-2] * b.shape[-1] * a.shape[-1] * math.prod(a.shape[:-2])
    m = math.prod(a.shape[:-1])
    return flops, (m, b.shape[-1], a.shape[-1])


def _attention_flops(func, args, kwargs) -> float:
    """q k^T and p v, 4 b h s_q s_k d FLOPs, half of it under the causal mask; backward 2.5x
    (five matmuls against two)."""
    backward = func in ATTENTION_BACKWARD
    q, k = (args[1], args[2]) if backward else (args[0], args[1])
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    flops = 4.0 * b * h * s_q * s_k * d
    if _is_causal(func, args, kwargs):
        flops /= 2
    return flops * (2.5 if backward else 1.0)


def _is_causal(func, args, kwargs) -> bool:
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "is_causal":
            if arg.name in kwargs:
                return bool(kwargs[arg.name])
            return bool(args[i]) if i < len(args) else bool(arg.default_value)
    return False

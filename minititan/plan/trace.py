"""What one rank's step does, in program order: its compute ops and its collectives.

The dry run passes every op to `StepTrace.on_op`. Compute ops are recorded with what the time
model needs and nothing else: their kind (GEMM, attention, element-wise, optimizer), FLOPs
(matmuls and attention) and the bytes they read and write. A collective is recorded where it
is issued, with its kind, bytes and the ranks of its group, and again where the code waits for
it (`on_wait`, from the FakeWork handle), because that is where the compute stream waits on a
GPU. So the trace holds the overlap the code really has: a prefetched FSDP all-gather is issued
one unit before it is waited for; a tensor-parallel all-reduce is waited for at once.

    events  [("op", phase, kind, flops, bytes, fp8, where, size), ("issue", Collective), ("wait", id), ...]

where is "eager", or under compile "graph" (an op of a compiled graph that writes its output)
or "fused" (one whose output a fusing compiler keeps in registers, plan/compiled.py): their
bytes count only what a fused kernel reads from memory and writes back.

size is a grouped GEMM's smallest per-group dimension (0 for other ops): small experts run slower.

phase is "forward", "backward" (an autograd node is running: includes activation recompute)
or "step" (after the gradients are complete: grad norm, clipping, the optimizer).
"""
from __future__ import annotations

import dataclasses
import weakref

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
    dims: str = ""  # the mesh dims its group spans ("dp_shard+cp", "tp", "ep" ...: StepTrace.name_groups)
    flat: bool = False  # 1-D buffers: FSDP's flat units (tensor and sequence collectives are n-D)


COLLECTIVE_KINDS = {
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce", "alltoall_base_": "all_to_all", "alltoall_": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "broadcast_": "broadcast",
}

GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_mm.default, aten.linear.default,
         aten.matmul.default}
ATTENTION_FORWARD = {aten._scaled_dot_product_flash_attention.default,
                     aten._scaled_dot_product_cudnn_attention.default,
                     aten._scaled_dot_product_efficient_attention.default,
                     aten._scaled_dot_product_flash_attention_for_cpu.default}
ATTENTION_BACKWARD = {aten._scaled_dot_product_flash_attention_backward.default,
                      aten._scaled_dot_product_cudnn_attention_backward.default,
                      aten._scaled_dot_product_efficient_attention_backward.default,
                      aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
        aten.empty_like.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
        aten._unsafe_view.default, aten._local_scalar_dense.default, aten.set_.source_Storage_storage_offset,
        aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default}
WRITE_ONLY = {aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.new_zeros.default,
              aten.new_ones.default, aten.new_full.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default,
              aten.zeros.default, aten.ones.default, aten.full.default, aten.arange.default, aten.arange.start,
              aten.arange.start_step, aten.scalar_tensor.default}  # they read no tensor data


def _optional(name: str):
    packet = getattr(aten, name, None)
    return packet.default if packet is not None else None


GROUPED_GEMMS = {op for op in (_optional("_grouped_mm"), _optional("_scaled_grouped_mm")) if op is not None}
FP8_GEMMS = {op for op in (aten._scaled_mm.default, _optional("_scaled_grouped_mm")) if op is not None}


class StepTrace:
    def __init__(self):
        self.events: list[tuple] = []
        self.collectives: dict[int, Collective] = {}
        self.phase = "forward"
        self._work_ids: dict[int, tuple[int, object]] = {}  # id(work handle) -> (collective id, handle)
        self._group_names: dict[tuple[int, ...], str] = {}
        self._fused = weakref.WeakSet()  # storages of fused intermediates (never written to memory)

    def start(self) -> None:
        """Forget what setup did: the trace is the step's."""
        self.events.clear()
        self.collectives.clear()
        self._work_ids.clear()
        self.phase = "forward"

    def name_groups(self, names: dict[tuple[int, ...], str]) -> None:
        """Ranks of a group -> the mesh dims it spans ("dp_shard+cp", "tp", "ep", "expert_dp" ...)."""
        self._group_names = names

    # ------------------------------------------------------------ compute

    def current_phase(self) -> str:
        return "backward" if torch._C._current_autograd_node() is not None else self.phase

    def on_op(self, func, args, kwargs, out, where: str = "eager") -> None:
        if func.namespace == "c10d":
            return self._issue(func, args, out)
        if func in FREE or func.is_view or func.namespace not in ("aten", "prims"):
            return
        phase = self.current_phase()
        nbytes = self._bytes_moved(func, args, kwargs, out, where)
        if func in GEMMS or func in GROUPED_GEMMS or func.overloadpacket is aten.mm:
            flops = _gemm_flops(func, args, kwargs, out)
            grouped = func in GROUPED_GEMMS
            self.events.append(("op", phase, "grouped gemm" if grouped else "gemm", flops, nbytes, func in FP8_GEMMS,
                                where, _smallest_group_dim(args, out) if grouped else 0))
        elif func in ATTENTION_FORWARD or func in ATTENTION_BACKWARD:
            self.events.append(("op", phase, "attention", _attention_flops(func, args, kwargs), nbytes, False, where, 0))
        elif func.overloadpacket in (aten._fused_adamw_, aten._fused_adam_) or (
                phase == "step" and func.name().startswith("aten::_foreach")):
            self.events.append(("op", phase, "optimizer", 0.0, nbytes, False, where, 0))
        elif nbytes:
            self.events.append(("op", phase, "elementwise", 0.0, nbytes, False, where, 0))

    def _bytes_moved(self, func, args, kwargs, out, where: str) -> int:
        """Bytes an op reads (its tensor arguments) and writes (its outputs and the arguments it
        mutates), each tensor once; inside a compiled graph, a fused intermediate is neither
        written nor read back."""
        read = [] if func in WRITE_ONLY else [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        written = {id(t): t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        for i, arg in enumerate(func._schema.arguments[:len(args)]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written |= {id(t): t for t in tree_flatten(args[i])[0] if isinstance(t, torch.Tensor)}
        if where != "eager":
            read = [t for t in read if t.untyped_storage() not in self._fused]
        if where == "fused":
            for t in written.values():
                self._fused.add(t.untyped_storage())
            written = {}
        return sum(_nbytes(t) for t in read) + sum(_nbytes(t) for t in written.values())

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
                       self._group_names.get(ranks, ""), bool(tensors) and tensors[0].dim() == 1)
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


def _gemm_flops(func, args, kwargs, out) -> float:
    """FLOPs of a matmul (torch's own formula where it has one); a grouped one as one GEMM:
    a [rows, k] against w [groups, k, n], each row meeting one group."""
    if func in GROUPED_GEMMS:
        a, b = args[0], args[1]
        return 2.0 * a.shape[-2] * a.shape[-1] * b.shape[-1]
    if func is aten.linear.default:  # x [..., k] @ w[n, k].T (inside a custom op's body)
        x, w = args[0], args[1]
        return 2.0 * x.numel() * w.shape[0]
    if func is aten.matmul.default:
        a, b = args[0], args[1]
        return 2.0 * a.numel() * b.shape[-1]
    return float(flop_registry[func.overloadpacket](*args, out_val=out, **kwargs))


def _smallest_group_dim(args, out) -> int:
    """The smallest of a grouped GEMM's per-group (rows, k, n), rows spread evenly over the groups:
    a [rows, k] @ b [groups, k, n] (forward and input gradient), or a [k, rows] @ b [rows, n] into
    [groups, k, n] (the weight gradient, summing over each group's rows)."""
    a, b = args[0], args[1]
    if b.dim() == 3:
        return min(a.shape[0] // b.shape[0], a.shape[1], b.shape[2])
    return min(a.shape[0], a.shape[1] // out.shape[0], b.shape[1])


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

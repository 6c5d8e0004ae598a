"""torch.compile in a dry run: the graphs and the saved tensors compile makes, without a compiler.

Compile changes memory in two ways, and a dry run cannot run inductor (no GPU; Triton):
  * what a compiled block keeps for backward: AOTAutograd's min-cut partitioner decides it,
    recomputing cheap element-wise results in backward instead of keeping them (a SwiGLU's silu
    output, a norm's output) and keeping what is dear to recompute;
  * what exists at once inside a block: inductor fuses chains of element-wise ops into one
    kernel, so their intermediates are never written (the loss's fp32 copy of the logits).

So in a dry run with compile.enable, `torch.compile(fn)` is replaced by `AotFunction(fn)`: on
the first call with given shapes it traces fn into forward and backward graphs with torch's
AOTAutograd and the same partitioner and decompositions inductor uses; every call then runs
those graphs op by op (the dry run records their ops and memory), and an intermediate of a
fusible op (element-wise or a reduction) whose users are all fusible too is not counted:
inductor would not write it.

What dynamo does with the code, the stand-in does too:
  * collectives (tensor parallel's, expert parallel's all-to-alls) are traced as dynamo traces
    them, as torch's functional collectives; run op by op, each is the c10d collective it
    stands for, so the dry run records it as in an eager step (`run_as_c10d`);
  * at a graph break (a host read such as expert parallel's split sizes, an async collective)
    dynamo compiles the code on either side, except inside a compiled checkpoint, where it runs
    the whole checkpointed block eagerly (block_runner compiles a checkpoint around such a block
    only under a selective policy; under full AC it checkpoints the compiled pieces). The
    stand-in traces on past a host read with the dry run's values, and runs a compiled
    checkpoint with a graph break eagerly, its reason in `fallbacks` saying so (EAGER_FOR_REAL).
A function the tracer cannot take for other reasons (code under torch.compiler.disable, such as
the cp ring; an async collective outside checkpointing) runs eagerly, as the part of the model
dynamo would leave out of its graphs, and `fallbacks` names it: priced slower than it runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import types

import torch
import torch.distributed as dist
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten, tree_unflatten

aten = torch.ops.aten
REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.amax.default, aten.amin.default,
              aten.max.dim, aten.logsumexp.default, aten._log_softmax.default, aten._softmax.default,
              aten.var_mean.correction, aten.prod.dim_int, aten.argmax.default, aten.log_softmax.int,
              aten.gather.default, aten.scatter.value, aten.scatter.src, aten.scatter_add.default}
FREE_TO_MAKE = {aten.full.default, aten.zeros.default, aten.ones.default, aten.scalar_tensor.default,
                aten.empty.memory_format, aten.arange.default, aten.arange.start, torch.ops.prims.iota.default}
# element-wise in inductor though not tagged so: each output element reads its inputs through an
# index (x[idx], a row replaced, a bucket found), which the consumer's kernel does in its loads
INDEXED_LOADS = {aten.index.Tensor, aten.select_scatter.default, aten.searchsorted.Tensor}


def fusible(node) -> bool:
    """Element-wise ops (indexed loads included), reductions and factories fuse; views go with what
    they view (tests/test_plan.py checks the rule against inductor's kernels on the CPU)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return (torch.Tag.pointwise in target.tags or target in REDUCTIONS or target in FREE_TO_MAKE or target.is_view
            or target in INDEXED_LOADS
            or target in (aten._to_copy.default, aten.clone.default, aten.where.self, aten.copy.default,
                          aten._unsafe_view.default, aten.view.default, aten.reshape.default))


def materialized(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes whose outputs a fusing compiler writes to memory: all but fusible ops feeding only
    fusible ops (views keep what they view)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if not fusible(node) or any(u.op == "output" or not fusible(u) for u in node.users):
            out.add(node.name)
    return out


class FusedRun(torch.fx.Interpreter):
    """Run a graph op by op, telling the dry run which outputs are not written (fused)."""

    def __init__(self, gm, keep: set[str], in_graph):
        super().__init__(gm)
        self.keep, self.in_graph = keep, in_graph

    def run_node(self, n):
        with self.in_graph(fused=n.op == "call_function" and n.name not in self.keep):
            return super().run_node(n)

    def call_function(self, target, args, kwargs):
        """Random ops recomputed in backward come wrapped in the rng-state operators, which need
        their own rules under each dispatch mode; their state is no tensor a dry run must hold."""
        from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state
        if target is run_and_save_rng_state:
            op, *rest = args
            return torch.zeros((), device=rest[0].device), op(*rest, **kwargs)
        if target is run_with_rng_state:
            _, op, *rest = args
            return op(*rest, **kwargs)
        return super().call_function(target, args, kwargs)


_TRACED: dict = {}  # structural key -> traced graphs (or None: runs eagerly), shared by the dry runs of a process
_current: dict = {}  # the running dry run's hooks: paused, in_graph


class AotFunction:
    """What torch.compile(fn) returns, in a dry run."""

    def __init__(self, fn, fallbacks: list[str]):
        self.fn, self.fallbacks = fn, fallbacks
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[i] for i in where]
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return self.fn(*args, **kwargs)  # no backward: the saved tensors do not matter
        cells = _captured_tensors(self.fn)
        captured = [cell.cell_contents for cell in cells]
        key = (_describe(self.fn), spec, tuple(_describe(x) for i, x in enumerate(leaves) if i not in where),
               tuple((type(t), tuple(t.shape), t.dtype, t.requires_grad, t.is_cuda) for t in tensors + captured))
        if key not in _TRACED:
            _TRACED[key] = self._trace(key, leaves, where, spec, tensors, cells)
        compiled = _TRACED[key]
        if compiled is None:
            self.fallbacks.append(_FAILED[key])
            return self.fn(*args, **kwargs)
        return compiled(*tensors, *captured)

    def _trace(self, key, leaves, where, spec, tensors, cells):
        from torch._functorch.aot_autograd import aot_function
        from torch._functorch.partitioners import min_cut_rematerialization_partition  # what inductor partitions with

        template = [None if i in where else x for i, x in enumerate(leaves)]  # no tensors: the trace is kept
        captured = [cell.cell_contents for cell in cells]

        def flat_fn(*ts):
            filled = list(template)
            for i, t in zip(where, ts):
                filled[i] = t
            args, kwargs = tree_unflatten(filled, spec)
            held = [cell.cell_contents for cell in cells]
            for cell, t in zip(cells, ts[len(where):]):  # the captured tensors, as inputs of the graph
                cell.cell_contents = t
            try:
                return self.fn(*args, **kwargs)
            finally:
                for cell, t in zip(cells, held):
                    cell.cell_contents = t

        def run_fused(gm, example_inputs):
            keep = materialized(gm)

            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

            def run(args: list):
                """Boxed, as inductor's are: the graph takes the argument list over, so each input
                (a saved activation, in backward) is freed after its last use, not at the end."""
                env = dict(zip(placeholders, args))
                args.clear()
                return FusedRun(gm, keep, _current["in_graph"]).run(initial_env=env)
            run._boxed_call = True
            return run

        recompute_all = _is_full_checkpoint(self.fn)

        def partition(joint, inputs, **kwargs):
            if recompute_all:  # what dynamo tags a checkpointed region with: recompute every op of the forward
                output = next(n for n in joint.graph.nodes if n.op == "output")
                for node in _ancestors(output.args[0][:kwargs["num_fwd_outputs"]]):
                    node.meta.setdefault("recompute", CheckpointPolicy.PREFER_RECOMPUTE)
            for node in joint.graph.nodes:  # activation checkpointing's tags, one region per graph (dynamo
                if "recompute" in node.meta and node.meta.get("ac_graph_id") is None:  # numbers them)
                    node.meta["ac_graph_id"] = 0
            forward, backward = min_cut_rematerialization_partition(joint, inputs, **kwargs)
            return _inline_constants(forward), _inline_constants(backward)

        traced = aot_function(flat_fn, fw_compiler=run_fused, bw_compiler=run_fused, partition_fn=partition,
                              decompositions=_decompositions())
        try:
            with _current["paused"](), _compiling(), _traceable_collectives(), _host_reads(_is_checkpointed(self.fn)):
                # tracing is not the step: the dry run records nothing
                # on stand-ins of the inputs: the traced function keeps its example inputs alive;
                # under hooks of its own, so that a checkpoint around the call (block_runner checkpoints
                # a graph-breaking block outside its compiled pieces) does not count what tracing saves
                with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                    traced(*[_stand_in(t).requires_grad_(t.requires_grad) for t in tensors + captured])
        except Exception as e:  # noqa: BLE001  whatever the tracer cannot take runs eagerly, as dynamo would
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if isinstance(e, GraphBreak) and _is_checkpointed(self.fn):
                why = (f"{EAGER_FOR_REAL}: {e} inside a block checkpointed by a selective policy, where dynamo "
                       f"cannot break the graph")
            _FAILED[key] = f"{_name(self.fn)} ({why})"
            return None
        return traced


_FAILED: dict = {}  # structural key -> why it runs eagerly


def _same(t):
    return t


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor like t, of t's own type: a tensor subclass stays one (Float8's
    HighPrecisionWeight, which the traced code tells apart by its type, as dynamo's trace does)."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        return type(t).__tensor_unflatten__({n: _stand_in(getattr(t, n)) for n in names}, meta, t.shape, t.stride())
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _captured_tensors(fn) -> list:
    """The closure cells holding tensors, in fn and the functions it wraps (partials, closures).
    dynamo makes such captured tensors inputs of its graph (an in-place update of one, like the MoE
    layer's balance log, becomes a mutation of an input); the stand-in does the same."""
    cells, seen, todo = [], set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, functools.partial):
            todo += [f.func, *(a for a in f.args if isinstance(a, (types.FunctionType, functools.partial)))]
            continue
        for cell in getattr(f, "__closure__", None) or ():
            value = cell.cell_contents if _is_filled(cell) else None
            if isinstance(value, torch.Tensor):
                cells.append(cell)
            elif isinstance(value, (types.FunctionType, functools.partial)):
                todo.append(value)
    return cells


def _is_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _inline_constants(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A Python number the traced code puts into a tensor (`offs[-1] = rows`) becomes a real 0-d
    tensor attribute of the graph. AOTAutograd deep-copies the backward graph on its first run,
    which inside the dry run's fake mode cannot copy a real tensor; so each such constant is made
    by the graph itself instead (torch.tensor of its values: a few numbers)."""
    for node in list(gm.graph.nodes):
        value = getattr(gm, node.target, None) if node.op == "get_attr" else None
        if type(value) is torch.Tensor:
            with gm.graph.inserting_before(node):
                made = gm.graph.call_function(torch.tensor, (value.tolist(),), {"dtype": value.dtype})
            node.replace_all_uses_with(made)
            gm.graph.erase_node(node)
            delattr(gm, node.target)
    gm.recompile()
    return gm


def _describe(x):
    """What of a non-tensor argument shapes the traced graph: values of plain data, the code of
    functions (a partial: its function and arguments), the size of a process group, the fields
    of a dataclass such as model.Ops; not object identities, which differ from one dry run to the next."""
    if isinstance(x, (int, float, str, bool, type(None), torch.dtype)):
        return x
    if isinstance(x, functools.partial):
        return ("partial", _describe(x.func), tuple(_describe(a) for a in x.args),
                tuple(sorted((k, _describe(v)) for k, v in x.keywords.items())))
    if isinstance(x, (tuple, list)):
        return tuple(_describe(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((str(k), _describe(v)) for k, v in x.items()))
    if isinstance(x, dist.ProcessGroup):  # its name: a traced graph's collectives name their group
        return ("group", x.size(), x.group_name)
    if dataclasses.is_dataclass(x):
        return (type(x).__qualname__, tuple((f.name, _describe(getattr(x, f.name))) for f in dataclasses.fields(x)))
    code = getattr(x, "__code__", None)
    if code is not None:  # a function or closure: its code and what it closes over
        cells = tuple(_describe(c.cell_contents) for c in (x.__closure__ or ()) if _is_plain(c))
        return (code.co_filename, code.co_firstlineno, cells)
    return (type(x).__qualname__, getattr(x, "__qualname__", None))


def _is_plain(cell) -> bool:
    if not _is_filled(cell):
        return False
    value = cell.cell_contents
    return isinstance(value, (int, float, str, bool, type(None), torch.dtype, tuple, functools.partial,
                              dist.ProcessGroup)) or callable(value)


def _is_checkpointed(fn) -> bool:
    """activation_checkpoint.block_runner's checkpoint of a block (full or selective)."""
    return isinstance(fn, functools.partial) and fn.func.__name__ == "_checkpointed"


def _is_full_checkpoint(fn) -> bool:
    """activation_checkpoint.block_runner's checkpoint of a whole block (no selective policy)."""
    return _is_checkpointed(fn) and not fn.args[1].get("context_fn")


def _ancestors(nodes) -> list:
    seen, stack = {}, [n for n in nodes if isinstance(n, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node.name not in seen:
            seen[node.name] = node
            stack += node.all_input_nodes
    return [n for n in seen.values() if n.op == "call_function"]


def _name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.args[0] if fn.func.__name__ == "_checkpointed" else fn.func
    return getattr(fn, "__name__", str(fn))


@functools.cache
def _decompositions():
    try:
        from torch._inductor.decomposition import select_decomp_table
        return select_decomp_table()
    except Exception:  # noqa: BLE001  an inductor-less build traces without them
        return {}


@contextlib.contextmanager
def _compiling():
    """torch.compiler.is_compiling() answers True while tracing, as under dynamo (the model's
    compiled branches: the fused loss, RoPE in real arithmetic)."""
    is_compiling = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = is_compiling


EAGER_FOR_REAL = "eager in the real step too"  # begins the reason of a fallback that dynamo makes as well


class GraphBreak(RuntimeError):
    """What dynamo breaks its graph at. It then compiles the code on either side of it, except
    inside a compiled checkpoint: there it runs the whole checkpointed block eagerly (torch 2.11
    and 2.13, checked on gloo: docs/plan.md)."""


@contextlib.contextmanager
def _traceable_collectives():
    """dist.all_to_all_single & co. as dynamo traces them: remapped to torch's functional
    collectives (torch.distributed._functional_collectives.traceable_collective_remaps, the map
    dynamo uses), whose graph nodes name their group by its name. Called as they are, AOTAutograd
    would trace the c10d ops themselves, effectful and holding the ProcessGroup object, which the
    dry run's dispatch modes, the fake tensor cache and the graph's deep copy cannot take. Like
    dynamo, which knows a function by its identity, every reference is replaced: torch.distributed's
    and the module-level aliases of minititan's modules (collectives/mesh.py's all_gather_single).
    An async one (async_op=True, async TP's) is a graph break, as for dynamo."""
    from torch.distributed import _functional_collectives as functional
    remaps = {id(fn): _blocking_only(to) for fn, to in functional.traceable_collective_remaps.items()
              if fn.__name__ in _COLLECTIVES}
    modules = [dist] + [m for name, m in list(sys.modules.items()) if name.startswith("minititan.") and m is not None]
    replaced = [(m, name, fn) for m in modules for name, fn in list(vars(m).items()) if id(fn) in remaps]
    for m, name, fn in replaced:
        setattr(m, name, remaps[id(fn)])
    try:
        yield
    finally:
        for m, name, fn in replaced:
            setattr(m, name, fn)


def _blocking_only(traceable):
    def collective(*args, async_op: bool = False, **kwargs):
        if async_op:
            raise GraphBreak("an async collective (async_op=True)")
        return traceable(*args, **kwargs)
    return collective


@contextlib.contextmanager
def _host_reads(checkpointed: bool):
    """A host read of a traced tensor (expert parallel's split sizes, `.tolist()`) is a graph
    break. Outside activation checkpointing dynamo compiles the code on either side of it: the
    stand-in traces on with the values the dry run gives that tensor (plan/fake.py's balanced
    routing), one graph where dynamo makes several."""
    from torch._subclasses.functional_tensor import FunctionalTensor
    from minititan.plan.fake import FakeGPU
    real = FunctionalTensor.tolist

    def tolist(t):
        if checkpointed:
            raise GraphBreak("a host read (.tolist())")
        values = FakeGPU.shadow(t)
        return values.tolist() if values is not None else real(t)

    FunctionalTensor.tolist = tolist
    try:
        yield
    finally:
        FunctionalTensor.tolist = real


# the blocking collectives run_as_c10d runs (point-to-point and async_op=True stay as they are: dynamo
# breaks its graph there too)
_COLLECTIVES = {"all_reduce", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "reduce_scatter_tensor",
                "reduce_scatter_single", "_reduce_scatter_base", "all_to_all_single"}


def run_as_c10d(func, args, recorder):
    """A functional collective of a traced graph, run as the c10d collective it stands for on the
    fake process group, under `recorder` (the dry run's), so the collective is recorded (its kind,
    bytes and group) where it is issued and, at its wait_tensor, where it is waited for, as in an
    eager step. Its output is a new buffer, as in the compiled graph (no copy of the input: an
    all-reduce's values need none in a dry run, and inductor reuses the input's buffer where it can)."""
    c10d = torch.ops._c10d_functional
    if func is c10d.wait_tensor.default:
        work = _in_flight.pop(id(args[0].untyped_storage()), None)
        if work is not None:
            work.wait()
        return args[0]
    from torch.distributed.distributed_c10d import _resolve_process_group
    from minititan.collectives import mesh  # all_gather_single where torch has it (2.13 deprecates the older name)
    x, group = args[0], _resolve_process_group(args[-1])
    with recorder:
        if func is c10d.all_to_all_single.default:
            out = x.new_empty((sum(args[1]),) + tuple(x.shape[1:]))
            work = dist.all_to_all_single(out, x.contiguous(), list(args[1]), list(args[2]), group=group, async_op=True)
        elif func is c10d.all_reduce.default:
            out = x.new_empty(x.shape)
            work = dist.all_reduce(out, _REDUCE_OPS[args[1]], group=group, async_op=True)
        elif func is c10d.all_gather_into_tensor.default:
            out = x.new_empty((x.shape[0] * args[1],) + tuple(x.shape[1:]))
            work = mesh.all_gather_single(out, x.contiguous(), group=group, async_op=True)
        elif func is c10d.reduce_scatter_tensor.default:
            out = x.new_empty((x.shape[0] // args[2],) + tuple(x.shape[1:]))
            work = mesh.reduce_scatter_single(out, x.contiguous(), _REDUCE_OPS[args[1]], group=group, async_op=True)
        else:
            raise NotImplementedError(f"the dry run has no rule for the functional collective {func}")
    _in_flight[id(out.untyped_storage())] = work
    return out


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}
_in_flight: dict = {}  # storage of a functional collective's output -> its c10d work, until wait_tensor


@contextlib.contextmanager
def stand_in_for_compile(paused, in_graph, fallbacks: list[str]):
    """torch.compile -> AotFunction inside the block (scoped: restored on exit)."""
    real = torch.compile

    def compile(fn=None, **options):
        if fn is None:  # used as @torch.compile(...)
            return lambda f: AotFunction(f, fallbacks)
        return AotFunction(fn, fallbacks)

    torch.compile = compile
    _current.update(paused=paused, in_graph=in_graph)
    try:
        yield
    finally:
        torch.compile = real
        _current.clear()

"""The fake world: one rank of an N-rank GPU job, run on one CPU with nothing of real size.

    with fake_world(world_size=512, rank=17), fake_tensors(capability=(9, 0)):
        layout = parallelize.build(cfg, mesh, torch.device("cuda"))   # the real code, unchanged
        train_step(...)

Three pieces of torch make this possible, and this file adds what they leave out:

  * a process group of the target world size that does no communication: torch's "fake"
    backend (torch/testing/_internal/distributed/fake_pg.py registers it; the C++
    FakeProcessGroup answers every collective at once). `dist.new_group` works as usual, so the
    mesh builds the same groups as a real job, and rank 17 sees its own group ranks.
  * tensors that hold no storage: FakeTensorMode. Every op runs its meta kernel: shapes,
    dtypes and strides are right, no memory is touched, so a 405B model's weights cost nothing.
    The collectives' meta kernels return FakeWork handles whose wait() returns at once.
  * fake tensors that pose as CUDA tensors. A CPU build of torch cannot hold even a fake CUDA
    tensor (autograd asks for the CUDA device guard), so they live on the CPU, and:
      - factories and copies asked for a CUDA device get the CPU (FakeGPU below rewrites the
        device argument), so the layout can be built with device "cuda";
      - FakeTensor.is_cuda answers True, so the model takes the branches it takes on a GPU
        (cuDNN attention with shared kv heads, weight gradients written in fp32 by the GEMM,
        flash attention blocks in ring attention, grouped GEMMs for the experts, _scaled_mm);
        so does FunctionalTensor's, the wrapper the compile stand-in's tracer (plan/compiled.py)
        puts around them, else a compiled block would trace the CPU's branches;
      - torch.cuda.get_device_capability answers the profile's (9, 0 for an H100);
      - the few ops whose CUDA kernel is one fused kernel but whose CPU version is a composite
        of smaller ops run as a stand-in with the CUDA kernel's outputs and saved tensors
        (F.rms_norm, whose CPU decomposition keeps three fp32 copies of its input for backward
        where the CUDA kernel keeps the input and one fp32 number per row: _FusedRMSNorm below);
        FlexAttention (document masking), which has no CPU backward, runs as causal flash
        attention, which keeps the same tensors (its block-sparse savings in time are not counted),
        with no BlockMask (whose build is a few ops on [batch, seq / 128] tensors).
    The patches are undone on exit and exist only inside `fake_tensors()`.

Host values. A fake tensor has no values, so reading one on the host (`.tolist()`, `.item()`)
cannot work. The training step reads none, except expert parallel's split sizes (the tokens
each rank sends to each other rank). For those FakeGPU keeps a real copy ("shadow") of every
small integer tensor whose inputs are known: the routing's chosen experts are taken to be
perfectly balanced (token t's j-th choice is expert (t * top_k + j) mod n_experts), and the
integer ops after it (counting, sorting, all-to-all of the counts, cumsum...) run for real on
the shadows. So a dry run sees the splits that balanced routing gives: every rank of an ep
group receives the same number of rows. The compile stand-in's tracer wraps the fake tensors
(FunctionalTensor) and traces collectives as functional ones: the shadows ride on the wrappers
and through those collectives too, so a traced block reads the same values (plan/compiled.py).
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._subclasses.functional_tensor import FunctionalTensor
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from torch.testing._internal.distributed import fake_pg  # noqa: F401  registers the "fake" backend

aten = torch.ops.aten
CPU = torch.device("cpu")
DEVICE_QUERY = torch.ops.prim.device.default


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """The default process group is a fake one of `world_size` ranks, this process being `rank`."""
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group: run it in its own process")
    excepthook = sys.excepthook  # init_process_group wraps it to prefix [rankN]: one more layer per dry run
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


@contextlib.contextmanager
def fake_tensors(capability: tuple[int, int] | None = (9, 0)):
    """Fake tensors posing as CUDA tensors of a device with this compute capability; with
    capability None, plain fake CPU tensors (the CPU's code path, to compare with a real CPU run)."""
    get_capability = torch.cuda.get_device_capability
    if capability is not None:
        torch.cuda.get_device_capability = lambda device=None: capability
        FakeTensor.is_cuda = FunctionalTensor.is_cuda = property(lambda self: True)
    rms_norm = F.rms_norm
    from torch.nn.attention import flex_attention as flex
    from minititan.core import document_attention
    attention_fns = flex.flex_attention, document_attention.block_mask
    if capability is not None:
        F.rms_norm = _fused_rms_norm
        flex.flex_attention, document_attention.block_mask = _flex_as_flash, lambda documents: None
        document_attention._flex.cache_clear()  # it holds the flex_attention it found first
    gpu = FakeGPU()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), gpu:
            yield gpu
    finally:
        if capability is not None:
            del FakeTensor.is_cuda, FunctionalTensor.is_cuda
            torch.cuda.get_device_capability = get_capability
            F.rms_norm = rms_norm
            flex.flex_attention, document_attention.block_mask = attention_fns
            document_attention._flex.cache_clear()


def device_query(args):
    """tensor.device asked from C++ (autograd, the ops' argument checks: most ops of a step ask, some
    several times), answered here as FakeTensorMode answers it, without passing through every
    dispatch mode beneath: None for a tensor that is not fake."""
    t = args[0]
    if type(t) is not FakeTensor:
        return None
    return torch.device("meta") if t.fake_mode.in_kernel_invocation else t.fake_device


def _to_cpu(device):
    return CPU if torch.device(device).type == "cuda" else device


def _is_int(t) -> bool:
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())


class FakeGPU(TorchDispatchMode):
    """CUDA device arguments become the CPU; small integer tensors carry real shadow values."""

    max_shadow_numel = 1 << 24  # larger integer tensors (token ids of huge batches) get none

    def __init__(self):
        super().__init__()
        self.topk_experts = None  # n_experts for the balanced routing rule; set by the dry run

    @staticmethod
    def shadow(t):
        """The real values of an integer tensor, or None. A real tensor is its own."""
        if type(t) is torch.Tensor:
            return t
        return getattr(t, "_host_values", None) if isinstance(t, (FakeTensor, FunctionalTensor)) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is DEVICE_QUERY:
            device = device_query(args)
            return device if device is not None else func(*args, **kwargs)
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=_to_cpu(kwargs["device"]))
        if any(type(a) is torch.device for a in args):  # no aten op takes a device nested deeper (a list)
            args = tuple(_to_cpu(a) if type(a) is torch.device else a for a in args)
        if func is aten._local_scalar_dense.default:
            value = self.shadow(args[0])
            if value is None:
                raise RuntimeError("the dry run reads a tensor's value on the host, which a fake tensor does not "
                                   "have: the training step should not read device values (see plan/fake.py)")
            with _disable_current_modes():  # fake tensor mode would take the real value for a fake one
                return value.item()
        out = func(*args, **kwargs)
        self._propagate(func, args, kwargs, out)
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        """Give the integer outputs of this op real values, if its integer inputs have them."""
        if func.namespace == "c10d":  # a collective of integers: every rank is alike, so they receive what they send
            return self._collective(func, args)
        if func.namespace == "_c10d_functional":  # the same, traced by the compile stand-in: out = f(input)
            return self._collective(func, (out, args[0]))
        if func is aten.topk.default:
            return self._balanced_choice(out)
        outputs = tensors_of(out)
        mutated = _mutated_int_input(func, args)
        if not any(_is_int(t) and t.numel() <= self.max_shadow_numel for t in outputs) and mutated is None:
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(not _is_int(t) for t in inputs) or any(self.shadow(t) is None for t in inputs):
            if mutated is not None:
                mutated._host_values = None  # its values are no longer known
            return
        real_args, real_kwargs = tree_map(lambda t: self.shadow(t) if isinstance(t, torch.Tensor) else t,
                                          (args, kwargs))
        with _disable_current_modes():
            real_out = func(*real_args, **real_kwargs)
        for fake, real in zip(tree_flatten(out)[0], tree_flatten(real_out)[0]):
            if isinstance(fake, (FakeTensor, FunctionalTensor)) and isinstance(real, torch.Tensor):
                fake._host_values = real

    def _balanced_choice(self, out) -> None:
        """topk's indices under perfectly balanced routing: row t's j-th pick is (t * k + j) mod n."""
        indices = out[1]
        if self.topk_experts is None or indices.numel() > self.max_shadow_numel:
            return
        k = indices.shape[-1]
        with _disable_current_modes():
            flat = torch.arange(indices.numel(), dtype=indices.dtype) % self.topk_experts
            real = flat.view(-1, k).view(indices.shape).clone()
        indices._host_values = real

    def _collective(self, func, args) -> None:
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if len(tensors) >= 2 and _is_int(tensors[0]) and self.shadow(tensors[1]) is not None \
                and tensors[0].shape == tensors[1].shape:
            with _disable_current_modes():
                tensors[0]._host_values = self.shadow(tensors[1]).clone()


def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):
    """F.rms_norm as it runs on CUDA (see _FusedRMSNorm)."""
    return _FusedRMSNorm.apply(input, tuple(normalized_shape), weight)


def _flex_as_flash(q, k, v, block_mask=None, enable_gqa=False, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)


class _FusedRMSNorm(torch.autograd.Function):
    """aten._fused_rms_norm as it is on CUDA: reads x (and w) once, writes y and an fp32 rstd per
    row, keeps x, rstd (and w) for backward, whose kernel reads dy and x and writes dx (and dw).
    One element-wise op stands for each kernel, so the trace counts the same bytes."""

    @staticmethod
    def forward(ctx, x, shape, w):
        y = x * w if w is not None else x.clone()
        rstd = x.new_empty(x.shape[:x.dim() - len(shape)] + (1,) * len(shape), dtype=torch.float32)
        ctx.save_for_backward(x, rstd, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, w = ctx.saved_tensors
        dx = dy * x
        dw = torch.empty_like(w) if w is not None and ctx.needs_input_grad[2] else None
        return dx, None, dw


def tensors_of(out) -> list[torch.Tensor]:
    """The tensors an op returned. Every op of a dry run asks, and nearly all return a tensor or a
    flat tuple of them: those skip the general (and slower) pytree walk."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple) and not any(isinstance(x, (tuple, list, dict)) for x in out):
        return [x for x in out if isinstance(x, torch.Tensor)]
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


_WRITES_FIRST: dict = {}  # op -> whether it writes into its first argument (read from its schema once)


def _mutated_int_input(func, args):
    """The integer tensor an in-place op writes into (its first argument), if any."""
    writes = _WRITES_FIRST.get(func)
    if writes is None:
        first_arg = func._schema.arguments[:1]
        writes = _WRITES_FIRST[func] = bool(first_arg) and first_arg[0].alias_info is not None \
            and first_arg[0].alias_info.is_write
    if writes:
        first = args[0] if args else None
        return first if _is_int(first) else None
    return None

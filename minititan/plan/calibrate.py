"""`minititan plan --calibrate OUT.toml`: measure this GPU's constants and write its profile.

What it times, each with CUDA events after warm-up (a minute or two on an H100):
  gemm_tflops        bf16 GEMMs at the 8B model's shapes (tokens 8192: 4096 x 4096, 4096 x 14336,
                     14336 x 4096, and the 128,256-word output layer)
  gemm_fp8_tflops    the same through torch._scaled_mm (tensorwise e4m3), where the GPU has fp8
  grouped_gemm_tflops  torch._grouped_mm alone, forward + backward, at configs/moe_4b.toml's 8 experts
                     of dim 2048 x hidden 2816, 16,384 rows spread evenly, where it runs (sm90+);
                     grouped_gemm_rolloff_dim (how smaller experts slow down) is not measured:
                     it is the base profile's
  attention_tflops   causal SDPA forward + backward (cuDNN first, as the model asks), b 1, s 8192,
                     32 query / 8 kv heads of 128, by plan/trace.py's FLOP count
  hbm_gbs            a 2 GiB copy: bytes read + written per second
  elementwise_efficiency   a bf16 multiply of two 1 GiB tensors against that copy
  kernel_us          a tiny kernel's time on the device, back to back
  host_op_us         the host's time per eager op (Python, dispatch, launch), not waiting
  optimizer_efficiency   torch's fused AdamW and the foreach one on 0.5 B fp32 parameters (28
                     bytes each) against the copy; the compiled update is the copy's (it reaches it)
  memory_gib, reserved_gib   what mem_get_info reports, and what is taken before any tensor
The links (nvlink_gbs, network_gbs and latencies) need several GPUs and are not measured here:
they are copied from the shipped profile of the same GPU family (or the H100's), and said so.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec

from minititan.core.config import UserError
from minititan.plan import devices


def calibrate(out_path: str) -> None:
    import torch
    if Path(out_path).suffix != ".toml" or not Path(out_path).parent.is_dir():  # before minutes of measuring
        raise UserError(f"--calibrate {out_path}: name a .toml file in an existing folder (--gpu reads it back), "
                        f"e.g. --calibrate ./my_gpu.toml")
    if not torch.cuda.is_available():
        raise UserError("minititan plan --calibrate measures the GPU it runs on: run it where CUDA sees one")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device)
    free, total = torch.cuda.mem_get_info(device)
    torch.empty(1, device=device)
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)  # cuBLAS's workspace
    free_after, _ = torch.cuda.mem_get_info(device)
    base = _nearest_profile(name)
    measured = dict(
        capability=list(torch.cuda.get_device_capability(device)), memory_gib=round(total / 2**30, 1),
        reserved_gib=round(max(total - free_after, 2**30) / 2**30, 2),
        gemm_tflops=_gemm(torch, device, fp8=False), attention_tflops=_attention(torch, device),
        kernel_us=_kernel_us(torch, device), host_op_us=_host_op_us(torch, device))
    if torch.cuda.get_device_capability(device) >= (8, 9):
        measured["gemm_fp8_tflops"] = _gemm(torch, device, fp8=True)
    if torch.cuda.get_device_capability(device) >= (9, 0):
        measured["grouped_gemm_tflops"] = _grouped_gemm(torch, device)
    hbm = _copy_gbs(torch, device)
    measured |= dict(hbm_gbs=round(hbm), elementwise_efficiency=round(_multiply_gbs(torch, device) / hbm, 3),
                     optimizer_efficiency={"fused": round(_adamw_gbs(torch, device, "fused") / hbm, 3),
                                           "compiled": 0.99,
                                           "foreach": round(_adamw_gbs(torch, device, "foreach") / hbm, 3)})
    write_profile(out_path, name, measured, base)
    print(f"wrote {out_path}: " + ", ".join(f"{k} {v}" for k, v in measured.items()))


def write_profile(out_path: str, gpu_name: str, measured: dict, base: devices.Device) -> None:
    """A profile in devices.toml's format: the base profile with the measured constants."""
    profile = msgspec.structs.replace(base, description=f"{gpu_name}, measured by minititan plan --calibrate "
                                      f"(links: {base.name}'s)", name="", **measured)
    key = "".join(c if c.isalnum() else "_" for c in gpu_name.lower()).strip("_")
    lines = [f"# written by `minititan plan --calibrate` on {time.strftime('%Y-%m-%d')}", f"[{key}]"]
    for field, value in msgspec.structs.asdict(profile).items():
        if field != "name" and value is not None:  # None: an optional rate the base left unset (TOML has no null)
            lines.append(f"{field} = {_toml(value)}")
    Path(out_path).write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # numbers, and strings (a TOML basic string is a JSON string here)


def _nearest_profile(name: str) -> devices.Device:
    shipped = devices.shipped()
    for key in shipped:
        if key in name.lower():
            return msgspec.structs.replace(shipped[key], name=key)
    return msgspec.structs.replace(shipped["h100"], name="h100")


def _timed(torch, fn, repeat: int = 10, warmup: int = 3) -> float:
    """Seconds per call of fn on the device."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def _gemm(torch, device, fp8: bool) -> float:
    tokens, flops, seconds = 8192, 0.0, 0.0
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)):
        a = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        if fp8:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            one = torch.ones((), device=device)
            seconds += _timed(torch, lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16))
        else:
            seconds += _timed(torch, lambda: a @ b.t())
        flops += 2.0 * tokens * k * n
    return round(flops / seconds / 1e12, 1)


def _grouped_gemm(torch, device) -> float:
    """torch._grouped_mm alone, forward and the backward's two GEMMs, at configs/moe_4b.toml's expert
    shapes (the up and the down projection): the plan prices the gathers and SwiGLU around them as
    element-wise work, so they stay out of this rate. Their smallest per-group dimension (rows per
    expert, and dim) is devices.GROUPED_REFERENCE_DIM, the shape the plan's roll-off for smaller
    experts is relative to."""
    n_experts, dim, hidden = 8, devices.GROUPED_REFERENCE_DIM, 2816
    rows = n_experts * devices.GROUPED_REFERENCE_DIM
    offs = torch.arange(1, n_experts + 1, device=device, dtype=torch.int32) * (rows // n_experts)
    flops, seconds = 0.0, 0.0
    for k, n in ((dim, hidden), (hidden, dim)):
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n_experts, n, k, device=device, dtype=torch.bfloat16) * k ** -0.5).requires_grad_()
        grad = torch.randn(rows, n, device=device, dtype=torch.bfloat16)

        def step():
            torch.autograd.grad(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs), [x, w], grad)
        seconds += _timed(torch, step)
        flops += 3 * 2.0 * rows * k * n
    return round(flops / seconds / 1e12, 1)


def _attention(torch, device) -> float:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, h, kv, s, d = 1, 32, 8, 8192, 128
    q = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad)
    flops = 4.0 * b * h * s * s * d / 2 * 3.5  # causal forward + a backward of 2.5 forwards
    return round(flops / _timed(torch, step) / 1e12, 1)


def _copy_gbs(torch, device) -> float:
    x = torch.empty(2**30, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / _timed(torch, lambda: y.copy_(x)) / 1e9


def _multiply_gbs(torch, device) -> float:
    x = torch.ones(2**29, device=device, dtype=torch.bfloat16)
    y = torch.ones_like(x)
    return 3 * x.numel() * 2 / _timed(torch, lambda: x * y) / 1e9


def _kernel_us(torch, device) -> float:
    """A tiny kernel's device time, launched from a CUDA graph: launched from Python the host is the
    bottleneck and this would measure host_op_us again."""
    x = torch.ones(8, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            x.add_(1)
    return round(_timed(torch, graph.replay, repeat=20) / 100 * 1e6, 2)


def _host_op_us(torch, device) -> float:
    x = torch.ones(8, device=device)
    for _ in range(100):
        x.add_(1)
    start = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    host = (time.perf_counter() - start) / 2000
    torch.cuda.synchronize()
    return round(host * 1e6, 2)


def _adamw_gbs(torch, device, implementation: str) -> float:
    from minititan.core.config import Optimizer
    from minititan.core.optim import AdamW
    params = {f"p{i}": torch.zeros(2**26, device=device, requires_grad=True) for i in range(8)}  # 0.5 B
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer = AdamW(params, Optimizer(implementation=implementation))
    n = sum(p.numel() for p in params.values())
    return 28 * n / _timed(torch, lambda: optimizer.step(1e-4), repeat=5, warmup=2) / 1e9

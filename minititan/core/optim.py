"""AdamW over a dict of fp32 master tensors, the learning-rate schedule, and gradient clipping.

The optimizer state is keyed by parameter name, so checkpoints save it under stable names and
a sharded layout simply hands it its local shards. `optimizer.implementation` picks the update:
torch's one fused kernel (`torch._fused_adamw_`, CUDA and CPU), which applies the gradient-
clipping coefficient as it reads each gradient; the same math compiled by inductor, which also
skips the fused kernel's write-back of the scaled gradient; or `torch._foreach_*` ops.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from minititan.core.config import LrScheduler, Optimizer


class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter), matching torch.optim.AdamW."""

    def __init__(self, params: dict[str, Tensor], cfg: Optimizer, model_compiled: bool = False):
        self.params = params
        on_gpu = any(p.is_cuda for p in params.values())
        self.implementation = pick_implementation(cfg.implementation, model_compiled, on_gpu)
        self.betas = tuple(cfg.betas)
        self.eps = cfg.eps
        self.weight_decay = cfg.weight_decay
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        self.steps = 0
        self._step_on_device = None  # the fused and compiled updates read the step count from device memory
        self._lr_on_device = self._one_on_device = None  # the compiled one reads lr (and 1, unclipped) there too

    @torch.no_grad()
    def step(self, lr: float, grad_scale: Tensor | None = None) -> None:
        """One update with every gradient first multiplied by grad_scale (a device scalar: the
        clipping coefficient of `clip_coefficient`), if given. The fused and compiled updates do
        that as they read each gradient, which saves the separate pass that clipping would be."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        self.steps += 1
        p = [self.params[n] for n in names]
        g = [self.params[n].grad for n in names]
        m = [self.exp_avg[n] for n in names]
        v = [self.exp_avg_sq[n] for n in names]
        if self.implementation == "foreach":
            return self._foreach_step(p, g, m, v, lr, grad_scale)
        if self._step_on_device is None:
            self._step_on_device = torch.full((), float(self.steps - 1), device=p[0].device)
        self._step_on_device.add_(1)
        beta1, beta2 = self.betas
        if self.implementation == "compiled":
            if self._lr_on_device is None:
                self._lr_on_device = torch.empty((), device=p[0].device)
                self._one_on_device = torch.ones((), device=p[0].device)
            self._lr_on_device.fill_(lr)
            scale = self._one_on_device if grad_scale is None else grad_scale
            return compiled_adamw()(p, g, m, v, self._lr_on_device, self._step_on_device, scale,
                                    beta1, beta2, self.weight_decay, self.eps)
        # the kernel divides each gradient by grad_scale (it is meant for unscaling AMP gradients)
        unscale = None if grad_scale is None else grad_scale.float().reciprocal()
        torch._fused_adamw_(p, g, m, v, [], [self._step_on_device] * len(p), lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
                            grad_scale=unscale)

    def _foreach_step(self, p, g, m, v, lr: float, grad_scale: Tensor | None) -> None:
        beta1, beta2 = self.betas
        if grad_scale is not None:
            torch._foreach_mul_(g, grad_scale)
        torch._foreach_mul_(p, 1 - lr * self.weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        bias1 = 1 - beta1 ** self.steps
        bias2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(p, m, denom, -lr / bias1)

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything to checkpoint, under names derived from the parameter names."""
        out = {f"optim.exp_avg.{n}": t for n, t in self.exp_avg.items()}
        out |= {f"optim.exp_avg_sq.{n}": t for n, t in self.exp_avg_sq.items()}
        return out


def lr_at(step: int, base_lr: float, total_steps: int, cfg: LrScheduler) -> float:
    """Linear warmup to base_lr over warmup_steps, then decay to base_lr * min_lr_ratio. step is 1-based."""
    if step <= cfg.warmup_steps:
        return base_lr * step / max(cfg.warmup_steps, 1)
    if cfg.decay == "constant":
        return base_lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1))
    shape = 1 - progress if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor | None:
    """What to multiply the gradients by so that their global norm is at most max_norm (None: no
    clipping). A device scalar: the host never reads the norm. AdamW.step applies it."""
    if max_norm <= 0:
        return None
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def local_sq_norm(grads: list[Tensor]) -> Tensor:
    """Sum of squares of these gradients, in fp32 (reduce it over the ranks that hold other parts)."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.float() for n in norms]).pow(2).sum()


def pick_implementation(implementation: str, model_compiled: bool, on_gpu: bool) -> str:
    """`auto` compiles the update only where the user already pays for the compiler and it wins: on a
    GPU (benchmarks/single_gpu.md); on the CPU its compile would cost more than it saves."""
    if implementation != "auto":
        return implementation
    return "compiled" if model_compiled and on_gpu else "fused"


@functools.cache
def compiled_adamw():
    """Compiled on first use: importing the compiler costs seconds that a run without it need not pay.
    No pointwise autotuning: to time its candidate configs, inductor clones each kernel's mutated
    inputs (p, m and v of the embedding: GiBs on top of the peak), and this memory-bound update
    gains nothing from the search."""
    return torch.compile(adamw_update, fullgraph=True, dynamic=False, options={"triton.autotune_pointwise": False})


def adamw_update(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], lr: Tensor, step: Tensor,
                 grad_scale: Tensor, beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    """The AdamW update as inductor sees it: each tensor's ops fuse into one kernel that reads
    p, g, m, v once and writes p, m, v. The fused CUDA kernel, given a clip coefficient, also writes
    the scaled gradient back: 4 of its 32 bytes a parameter. lr, step and grad_scale are device
    scalars, so they change without a recompile and the host never reads them."""
    bias1 = 1 - beta1 ** step
    bias2_sqrt = (1 - beta2 ** step).sqrt()
    for p_, g_, m_, v_ in zip(p, g, m, v):
        g_ = g_ * grad_scale
        m_.lerp_(g_, 1 - beta1)
        v_.mul_(beta2).addcmul_(g_, g_, value=1 - beta2)
        p_.mul_(1 - lr * weight_decay)
        p_.sub_(lr / bias1 * m_ / (v_.sqrt() / bias2_sqrt + eps))

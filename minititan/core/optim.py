"""AdamW over a dict of fp32 master tensors, the learning-rate schedule, and gradient clipping.

The optimizer state is keyed by parameter name, so checkpoints save it under stable names and
a sharded layout simply hands it its local shards. `optimizer.implementation` picks the update:
torch's one fused kernel (`torch._fused_adamw_`, CUDA and CPU), which applies the gradient-
clipping coefficient as it reads each gradient; the same math compiled by inductor, which also
skips the fused kernel's write-back of the scaled gradient; or `torch._foreach_*` ops.

Each implementation can skip a step on the device: `step(..., skip=flag)` with a device scalar
1.0 (skip) or 0.0 leaves the parameters, both moments and the step count as they were when the
flag is 1, without the host reading it (train.py passes "the gradient norm is not finite").
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
        device = next(iter(params.values())).device if params else torch.device("cpu")
        # updates taken, in device memory: the updates read it there, and a skipped step does not count
        self._step_on_device = torch.zeros((), device=device)
        self._lr_on_device = torch.empty((), device=device)  # the compiled update reads lr (and 1, unclipped) there
        self._one_on_device = torch.ones((), device=device)
        self._keep_all = torch.ones((), device=device)  # keep = 1 when there is no skip flag (not aliasing the one)

    @property
    def steps(self) -> int:
        """Updates taken so far (skipped steps excluded). Reads the device: for checkpoints, not per step."""
        return int(self._step_on_device.item())

    @steps.setter
    def steps(self, n: int) -> None:
        self._step_on_device.fill_(n)

    @torch.no_grad()
    def step(self, lr: float, grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
        """One update with every gradient first multiplied by grad_scale (a device scalar: the
        clipping coefficient of `clip_coefficient`), if given. The fused and compiled updates do
        that as they read each gradient, which saves the separate pass that clipping would be.
        skip: a float device scalar; where it is 1 the update is not taken (see the module docstring)."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        p = [self.params[n] for n in names]
        g = [self.params[n].grad for n in names]
        m = [self.exp_avg[n] for n in names]
        v = [self.exp_avg_sq[n] for n in names]
        self._step_on_device.add_(1 if skip is None else 1 - skip)
        if self.implementation == "foreach":
            return self._foreach_step(p, g, m, v, lr, grad_scale, skip)
        beta1, beta2 = self.betas
        if self.implementation == "compiled":
            self._lr_on_device.fill_(lr)
            scale = self._one_on_device if grad_scale is None else grad_scale
            keep = self._keep_all if skip is None else 1 - skip
            return compiled_adamw()(p, g, m, v, self._lr_on_device, self._step_on_device, scale, keep,
                                    beta1, beta2, self.weight_decay, self.eps)
        # the kernel divides each gradient by grad_scale (it is meant for unscaling AMP gradients), and
        # returns without writing anything where found_inf is 1 (how AMP's GradScaler skips a step)
        unscale = None if grad_scale is None else grad_scale.float().reciprocal()
        torch._fused_adamw_(p, g, m, v, [], [self._step_on_device] * len(p), lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
                            grad_scale=unscale, found_inf=skip)

    def _foreach_step(self, p, g, m, v, lr: float, grad_scale: Tensor | None, skip: Tensor | None) -> None:
        """The update in foreach ops. A skip multiplies every change by keep = 1 - skip (0 or 1); the
        gradients of a skipped step are not finite, so they are zeroed first (0 * NaN is NaN)."""
        beta1, beta2 = self.betas
        if grad_scale is not None:
            torch._foreach_mul_(g, grad_scale)
        keep = self._one_on_device if skip is None else 1 - skip
        if skip is not None:
            for x in g:
                torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_mul_(g, keep)
        step = self._step_on_device.clamp(min=1)  # a first step that is skipped leaves it at 0
        bias1 = 1 - beta1 ** step
        bias2_sqrt = (1 - beta2 ** step).sqrt()
        torch._foreach_mul_(p, 1 - lr * self.weight_decay * keep)
        torch._foreach_add_(m, torch._foreach_mul(torch._foreach_sub(g, m), (1 - beta1) * keep))  # lerp by keep
        torch._foreach_add_(v, torch._foreach_mul(torch._foreach_sub(torch._foreach_mul(g, g), v), (1 - beta2) * keep))
        denom = torch._foreach_div(torch._foreach_sqrt(v), bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, lr / bias1 * keep)
        torch._foreach_sub_(p, update)

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
                 grad_scale: Tensor, keep: Tensor, beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    """The AdamW update as inductor sees it: each tensor's ops fuse into one kernel that reads
    p, g, m, v once and writes p, m, v. The fused CUDA kernel, given a clip coefficient, also writes
    the scaled gradient back: 4 of its 32 bytes a parameter. lr, step, grad_scale and keep are device
    scalars, so they change without a recompile and the host never reads them. keep = 0 writes the
    old values back (a skipped step: its gradients are not finite, and `where` drops what they made)."""
    step = step.clamp(min=1)  # a first step that is skipped leaves it at 0
    bias1 = 1 - beta1 ** step
    bias2_sqrt = (1 - beta2 ** step).sqrt()
    kept = keep > 0
    for p_, g_, m_, v_ in zip(p, g, m, v):
        g_ = g_ * grad_scale
        m_new = m_.lerp(g_, 1 - beta1)
        v_new = v_ * beta2 + g_ * g_ * (1 - beta2)
        p_new = p_ * (1 - lr * weight_decay) - lr / bias1 * m_new / (v_new.sqrt() / bias2_sqrt + eps)
        m_.copy_(torch.where(kept, m_new, m_))
        v_.copy_(torch.where(kept, v_new, v_))
        p_.copy_(torch.where(kept, p_new, p_))

"""Validation: the loss on held-out tokens, computed by the same layout that trains.

Every `validation.freq` steps (and at the last step) the trainer evaluates `validation.steps`
batches of training.global_batch_size sequences from the held-out split: the built-in corpus keeps
its last 10% apart (core/data.py), data.holdout_fraction keeps that fraction of every source's
chunks apart, and a shard folder or token file given as validation.dataset is held out whole. The
batches are the same at every evaluation (batch i is a pure function of seed and i), so the curve
moves only because the model does.

The forward is the training forward without gradients: each rank takes its rows and runs the
trainer's micro-batch loop (layout/microbatches.py) with backward=False: the layout prepares
them (context parallel keeps its part of each sequence), the model runs with the layout's params
and ops (tensor-parallel loss, FSDP gathers, ring attention, a pipeline's stages), and the
per-rank sums add up over `layout.loss_group`, exactly like the training loss (under pp the sum
is on the last stage, and loss_group includes pp). val_loss is the mean token cross-entropy,
val_ppl its exp.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from minititan.core.config import Config, UserError
from minititan.core.data import TokenSource, rank_slice
from minititan.data.loader import to_device
from minititan.layout.microbatches import forward_backward


class Validator:
    def __init__(self, cfg: Config, layout, data: TokenSource, n_micro: int, device: torch.device):
        self.cfg, self.layout, self.n_micro, self.device = cfg, layout, n_micro, device
        v = cfg.validation
        self.enabled = v.enable
        if not self.enabled:
            return
        self.source, self.split = held_out(cfg, data)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.validation.freq == 0 or step == self.cfg.training.steps)

    def run(self) -> dict:
        """{"val_loss", "val_ppl", "val_time_s"}; val_time_s is wall time after the training step finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the time below is validation's alone
        start = time.perf_counter()
        t = self.cfg.training
        total = torch.zeros((), device=self.device)
        rows = rank_slice(self.layout.facts.data_rank, self.layout.facts.data_size, t.global_batch_size)
        with torch.profiler.record_function("validation"), torch.no_grad():  # a named range in a profiler trace
            for i in range(1, self.cfg.validation.steps + 1):
                batch = to_device(self.source.read(t.seed, i, t.global_batch_size, t.seq_len, self.split, rows,
                                                   documents=self.cfg.data.document_masking), self.device)
                total += forward_backward(self.layout, batch.inputs, batch.labels, self.n_micro, 1.0, backward=False,
                                          positions=batch.positions, documents=batch.documents)
            if dist.get_world_size(self.layout.loss_group) > 1:
                dist.all_reduce(total, group=self.layout.loss_group)
        loss = total.item() / (self.cfg.validation.steps * t.global_batch_size * t.seq_len)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_time_s": time.perf_counter() - start}


def held_out(cfg: Config, data: TokenSource) -> tuple[TokenSource, str]:
    """The validation token source and which of its splits to read."""
    name = cfg.validation.dataset
    if name and name != cfg.data.dataset:  # a folder or token file held out whole (the built-in corpus: its tail)
        return TokenSource(name, cfg.model.vocab_size, key="validation.dataset", holdout=1.0,
                           tokenizer=cfg.data.tokenizer), "val"
    if data.has_held_out(cfg.training.seq_len):
        return data, "val"
    raise UserError(f"data.dataset {cfg.data.dataset!r} has no held-out split: set data.holdout_fraction (e.g. 0.01: "
                    f"that fraction of every source is never trained on) or validation.dataset to a shard folder or "
                    f"token file of held-out text (make one with `minititan tokenize`)")

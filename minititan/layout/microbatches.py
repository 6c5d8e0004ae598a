"""The one micro-batch loop: the training step, validation and the pipeline's stages all run it.

A rank's rows of a batch are prepared once (context parallel keeps its part of each sequence),
then cut into micro-batches of training.local_batch_size rows. Each micro-batch's loss is its
summed token cross-entropy times `scale` (training: 1 / label tokens of the global batch, so that
gradients just add up over micro-batches and ranks); with `backward` its gradients accumulate in
.grad. Under pipeline parallel a micro-batch runs through the schedule of this rank's stages.

nanoGPT-style, the loop shows where the gradient reductions start: before the backward of the
last micro-batch (layout.start_last_microbatch), so that they overlap it. Not under a pipeline:
its backward accumulates each parameter's gradient once per pipeline microbatch, and a reduction
started at the first would miss the rest. The trainer finishes them after the loop
(layout.finish_grads).
"""
from __future__ import annotations

import torch
from torch import Tensor

from minititan.core import model
from minititan.layout.contract import Layout


def forward_backward(layout: Layout, inputs: Tensor, labels: Tensor, n_micro: int, scale: float,
                     backward: bool = True, positions: Tensor | None = None,
                     documents: Tensor | None = None) -> Tensor:
    """This rank's share of the loss of its rows, detached (on the last pp stage only under pp).
    backward=False: forward only (validation; call it under torch.no_grad()). positions and
    documents: per row [rows, seq] with data.document_masking (core/document_attention.py), else None."""
    total = torch.zeros((), device=inputs.device)
    inputs, labels, sequence_positions = layout.prepare(inputs, labels)
    if documents is not None:
        positions, documents = layout.prepare_documents(positions, documents)
    else:
        positions = sequence_positions
    for i, (x, y, p, d) in enumerate(split_rows(n_micro, inputs, labels, positions, documents)):
        if layout.pipeline is not None:
            loss = layout.pipeline.run(layout, x, y, p, scale, backward, documents=d)
            if loss is not None:
                total += loss
            continue
        if backward and i == n_micro - 1:
            for start in layout.start_last_microbatch:
                start()
        with layout.forward_context():
            loss = model.loss_sum(layout.params, x, y, layout.facts.model, layout.ops, positions=p, documents=d) * scale
        if backward:
            loss.backward()
        total += loss.detach()
    return total


def split_rows(n: int, inputs: Tensor, labels: Tensor, positions: Tensor | None,
               documents: Tensor | None) -> list[tuple]:
    """Rows cut into n micro-batches of (inputs, labels, positions, documents): per-row positions and
    documents ([rows, seq]) go with their rows, positions shared by all rows ([seq]) to every one."""
    def cut(t):
        return [t] * n if t is None or t.dim() == 1 else list(t.chunk(n))
    return list(zip(*(cut(t) for t in (inputs, labels, positions, documents))))

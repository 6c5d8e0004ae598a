"""Run one rank's schedule on tensors: its stages, and point-to-point messages over the pp group.

    actions = SCHEDULES["1f1b"](pp_rank, pp_size, n_microbatches, 1)
    loss = run_pipeline(actions, {pp_rank: stage_fn}, n_stages, pp_group,
                        activation_shape=(mb, seq, dim), activation_dtype=torch.bfloat16, device=device)

A stage is any function `(x, microbatch) -> y`: the first stage gets x=None and reads its own
microbatch (the tokens); the others get the previous stage's activation as a fresh leaf that
requires grad; the last stage returns its scalar loss for that microbatch. For the same
result as one process, that is the summed token losses / the global number of label tokens;
the weights' .grad then accumulate the sum over microbatches, exactly as one process running
forward+backward on each microbatch would leave them. The stage knows nothing of pipelines,
and the runtime nothing of models: it finds the weights by walking the autograd graph.

run_pipeline returns the loss summed over microbatches on the rank that holds the last stage
(a tensor still on the device, no host sync), None on the others.

Messages: each run of adjacent SEND/RECV actions is posted as one batch_isend_irecv; a rank
waits for a received tensor only when the compute that needs it starts, and for its sends at
the end. The schedule orders the posts so that this cannot deadlock and each link sends and
receives in the same order (NCCL matches point-to-point messages by order, not by tag). All
activations and gradients crossing stages have one shape and dtype, given as arguments: the
receiver must allocate the buffer before the tensor arrives. With NCCL, run one collective
over pp_group before the first call (see `connect`): batched P2P among only some ranks of a
group must not be its first operation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .schedule import B, COMMUNICATION, F, I, RECV_F, SEND_B, SEND_F, W, Action, peer, stage_rank
from .split_backward import backward_input

Stage = Callable[[Tensor | None, int], Tensor]


def connect(pp_group: dist.ProcessGroup, device: torch.device) -> None:
    """One all-reduce over the pp group, so its communicator exists on every rank before the
    pipeline's partial P2P batches (NCCL needs that; it is harmless elsewhere)."""
    dist.all_reduce(torch.zeros(1, device=device), group=pp_group)


def run_pipeline(actions: Sequence[Action], stages: dict[int, Stage], n_stages: int,
                 pp_group: dist.ProcessGroup | None, activation_shape: Sequence[int],
                 activation_dtype: torch.dtype, device: torch.device | str) -> Tensor | None:
    """Execute one rank's action list. pp_group may be None when no message is needed."""
    pipeline = _Pipeline(stages, n_stages, pp_group, tuple(activation_shape), activation_dtype, torch.device(device))
    pipeline.check(actions)
    i = 0
    while i < len(actions):
        if actions[i].kind in COMMUNICATION:
            j = i
            while j < len(actions) and actions[j].kind in COMMUNICATION:
                j += 1
            pipeline.post(actions[i:j])
            i = j
        else:
            pipeline.compute(actions[i])
            i += 1
    return pipeline.finish()


class _Pipeline:
    """What one rank holds while its list runs: tensors waiting to be used or sent, each
    microbatch's graph until its backward, and the weight halves of split backwards."""

    def __init__(self, stages, n_stages, pp_group, shape, dtype, device):
        self.stages, self.n_stages, self.group = stages, n_stages, pp_group
        self.shape, self.dtype, self.device = shape, dtype, device
        self.pp_size = dist.get_world_size(pp_group) if pp_group is not None else 1
        self.pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
        self.inbox: dict[tuple[str, int, int], tuple[Tensor, _Posted | None]] = {}  # (F|B, stage, mb) -> tensor
        self.outbox: dict[Action, Tensor] = {}  # SEND action -> the tensor it sends
        self.graphs: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}  # (stage, mb) -> (input, output)
        self.weight_backward: dict[tuple[int, int], Callable[[], None]] = {}
        self.posted: list[_Posted] = []  # batches not known to be complete
        self.loss: Tensor | None = None

    def check(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if a.kind not in COMMUNICATION and a.stage not in self.stages:
                raise ValueError(f"action {a} is for stage {a.stage}, but this rank's stages are "
                                 f"{sorted(self.stages)}: build the stages of rank {self.pp_rank}")
            if a.kind in COMMUNICATION and self.group is None:
                raise ValueError(f"action {a} is a message but pp_group is None: pass the pp process group")
            if stage_rank(a.stage, self.pp_size) != self.pp_rank:
                raise ValueError(f"action {a} belongs to rank {stage_rank(a.stage, self.pp_size)}, this is pp rank "
                                 f"{self.pp_rank}: pass this rank's list")

    # ------------------------------------------------------------ messages

    def post(self, batch: Sequence[Action]) -> None:
        self.posted = [p for p in self.posted if not p.done()]  # lets NCCL free what it has sent
        ops, arriving = [], []
        for a in batch:
            other = dist.get_global_rank(self.group, peer(a, self.pp_size)[0])
            if a.kind in (SEND_F, SEND_B):
                if a not in self.outbox:
                    raise ValueError(f"{a} comes before the compute that makes its tensor: fix the action list")
                ops.append(dist.P2POp(dist.isend, self.outbox.pop(a), other, self.group))
            else:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, other, self.group))
                arriving.append(((F if a.kind == RECV_F else B, a.stage, a.microbatch), buffer))
        posted = _Posted(dist.batch_isend_irecv(ops))
        for key, buffer in arriving:
            self.inbox[key] = (buffer, posted)
        self.posted.append(posted)

    def take(self, key: tuple[str, int, int]) -> Tensor:
        if key not in self.inbox:
            raise ValueError(f"{key[0]} of stage {key[1]}, microbatch {key[2]} needs a tensor that was never "
                             f"received: the list must post its RECV before the compute")
        tensor, posted = self.inbox.pop(key)
        if posted is not None:
            posted.wait()
        return tensor

    def pass_on(self, send: Action, key: tuple[str, int, int], tensor: Tensor) -> None:
        """Hand a tensor to the stage that needs it: directly if it is on this rank, else
        leave it for the SEND action."""
        if stage_rank(key[1], self.pp_size) == self.pp_rank:
            self.inbox[key] = (tensor, None)
        else:
            self.outbox[send] = tensor.contiguous()

    # ------------------------------------------------------------ compute

    def compute(self, a: Action) -> None:
        {F: self.forward, B: self.backward, I: self.backward_input, W: self.backward_weight}[a.kind](a.stage, a.microbatch)

    def forward(self, s: int, mb: int) -> None:
        x = self.take((F, s, mb)).requires_grad_() if s > 0 else None
        y = self.stages[s](x, mb)
        if s == self.n_stages - 1:
            if y.numel() != 1:
                raise ValueError(f"the last stage must return its scalar loss, got shape {tuple(y.shape)}")
            self.loss = y.detach() if self.loss is None else self.loss + y.detach()
        else:
            if tuple(y.shape) != self.shape or y.dtype != self.dtype:
                raise ValueError(f"stage {s} returned {tuple(y.shape)} {y.dtype}, but activation_shape and "
                                 f"activation_dtype say {self.shape} {self.dtype}: pass what the stages return")
            self.pass_on(Action(SEND_F, s, mb), (F, s + 1, mb), y.detach())
        self.graphs[(s, mb)] = (x, y)

    def output_grad(self, s: int, mb: int) -> Tensor | None:
        return None if s == self.n_stages - 1 else self.take((B, s, mb))

    def graph(self, s: int, mb: int) -> tuple[Tensor | None, Tensor]:
        if (s, mb) not in self.graphs:
            raise ValueError(f"the backward of stage {s}, microbatch {mb} comes before its forward: fix the action list")
        return self.graphs.pop((s, mb))

    def backward(self, s: int, mb: int) -> None:
        x, y = self.graph(s, mb)
        torch.autograd.backward(y, self.output_grad(s, mb))
        if x is not None:
            self.send_back(s, mb, x.grad if x.grad is not None else torch.zeros_like(x))

    def backward_input(self, s: int, mb: int) -> None:
        x, y = self.graph(s, mb)
        if x is None:  # the first stage owes nobody an input gradient: its whole backward now
            torch.autograd.backward(y, self.output_grad(s, mb))
            self.weight_backward[(s, mb)] = _nothing
            return
        x_grad, self.weight_backward[(s, mb)] = backward_input(y, self.output_grad(s, mb), x)
        self.send_back(s, mb, x_grad)

    def backward_weight(self, s: int, mb: int) -> None:
        if (s, mb) not in self.weight_backward:
            raise ValueError(f"W of stage {s}, microbatch {mb} comes before its I: fix the action list")
        self.weight_backward.pop((s, mb))()

    def send_back(self, s: int, mb: int, x_grad: Tensor) -> None:
        self.pass_on(Action(SEND_B, s, mb), (B, s - 1, mb), x_grad)

    def finish(self) -> Tensor | None:
        for posted in self.posted:
            posted.wait()
        left = [*self.inbox, *self.outbox, *self.graphs, *self.weight_backward]
        if left:
            raise ValueError(f"the action list ended with work left over ({left[:4]}...): every F needs its "
                             "backward, every message its compute")
        return self.loss


class _Posted:
    """The works of one batch_isend_irecv. NCCL may return one work for the whole batch, so a
    received tensor is ready when all of them are; each is waited for once (a second wait of
    a gloo P2P work never returns)."""

    def __init__(self, works: list):
        self.works, self.waited = works, False

    def wait(self) -> None:
        if not self.waited:
            for work in self.works:
                work.wait()
            self.waited = True

    def done(self) -> bool:
        return self.waited or all(work.is_completed() for work in self.works)


def _nothing() -> None:
    pass

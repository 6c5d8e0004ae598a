"""Pipeline schedules as data: for each pipeline rank, the ordered list of what it does.

A schedule is a pure function

    actions = SCHEDULES[name](pp_rank, pp_size, n_microbatches, n_virtual)

returning a list of `Action(kind, stage, microbatch)`. Nothing runs here: the same lists are
drawn by the viewer, timed by the simulator and executed on tensors by the runtime.

Kinds of action
    F       forward of one stage on one microbatch
    B       full backward (input and weight gradients at once)
    I, W    the backward split in two (zero bubble): I makes the input gradient the previous
            stage waits for; W makes the weight gradients, which nobody waits for, so it can
            be moved into time the rank would otherwise spend waiting
    SEND_F / RECV_F   the activation leaving stage s / arriving at stage s
    SEND_B / RECV_B   the input gradient leaving stage s / the output gradient arriving at s

Stages: the model is cut into n_stages = pp_size * n_virtual consecutive pieces. Virtual stage
s lives on rank s % pp_size, so rank r holds stages r, r + pp, r + 2 pp, ... ("chunks").

The four schedules differ only in the order of the compute actions (`*_order`); the messages
are added by one rule that cannot deadlock (`add_communication`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

F, B, I, W = "F", "B", "I", "W"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, I, W)
COMMUNICATION = (SEND_F, RECV_F, SEND_B, RECV_B)
COSTS = {F: 1.0, B: 2.0, I: 1.0, W: 1.0}  # time units: a backward costs about two forwards


class Action(NamedTuple):
    kind: str  # one of COMPUTE or COMMUNICATION
    stage: int  # virtual stage id
    microbatch: int

    def __str__(self):
        return f"{self.kind}{self.microbatch}@{self.stage}"


class DeadlockError(RuntimeError):
    """The ranks' lists cannot all finish."""


def stage_rank(stage: int, pp_size: int) -> int:
    """The pipeline rank that holds a virtual stage."""
    return stage % pp_size


def rank_stages(pp_rank: int, pp_size: int, n_virtual: int) -> list[int]:
    """The virtual stages of one rank, first chunk first."""
    return [chunk * pp_size + pp_rank for chunk in range(n_virtual)]


# ---------------------------------------------------------------- the schedules


def gpipe(pp_rank: int, pp_size: int, n_microbatches: int, n_virtual: int = 1) -> list[Action]:
    """All forwards, then all backwards. Simple; holds every microbatch's activations."""
    check(pp_rank, pp_size, n_microbatches, n_virtual, "gpipe")
    orders = [gpipe_order(r, n_microbatches) for r in range(pp_size)]
    return add_communication(orders, pp_rank)


def one_f_one_b(pp_rank: int, pp_size: int, n_microbatches: int, n_virtual: int = 1) -> list[Action]:
    """1F1B (PipeDream-flush): a few warm-up forwards, then alternate one forward and one
    backward, then drain the backwards. Same bubble as GPipe, but rank r holds at most
    pp_size - r microbatches of activations instead of all of them."""
    check(pp_rank, pp_size, n_microbatches, n_virtual, "1f1b")
    orders = [one_f_one_b_order(r, pp_size, n_microbatches) for r in range(pp_size)]
    return add_communication(orders, pp_rank)


def interleaved_1f1b(pp_rank: int, pp_size: int, n_microbatches: int, n_virtual: int = 2) -> list[Action]:
    """Megatron's interleaved 1F1B: each rank holds n_virtual chunks, so a microbatch crosses
    every rank n_virtual times and the pipeline fills and drains in steps of one chunk: the
    bubble shrinks by n_virtual, for n_virtual times more messages."""
    check(pp_rank, pp_size, n_microbatches, n_virtual, "interleaved_1f1b")
    orders = [interleaved_order(r, pp_size, n_microbatches, n_virtual) for r in range(pp_size)]
    return add_communication(orders, pp_rank)


def zero_bubble(pp_rank: int, pp_size: int, n_microbatches: int, n_virtual: int = 1) -> list[Action]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): the backward is split into
    I (input gradient, on the critical path) and W (weight gradient, off it). F and I run in
    1F1B order; rank r runs each W r steps late, so the W's pile up where the ranks would
    wait in 1F1B: at the end, on the last ranks. With F = I = W the bubble is a third of
    1F1B's, and no rank holds more than pp_size microbatches."""
    check(pp_rank, pp_size, n_microbatches, n_virtual, "zero_bubble")
    orders = [zero_bubble_order(r, pp_size, n_microbatches) for r in range(pp_size)]
    return add_communication(orders, pp_rank)


def gpipe_order(r: int, m: int) -> list[Action]:
    return [Action(F, r, i) for i in range(m)] + [Action(B, r, i) for i in range(m)]


def one_f_one_b_order(r: int, p: int, m: int) -> list[Action]:
    warmup = min(p - r - 1, m)
    order = [Action(F, r, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action(F, r, warmup + i), Action(B, r, i)]
    return order + [Action(B, r, i) for i in range(m - warmup, m)]


def interleaved_order(r: int, p: int, m: int, v: int) -> list[Action]:
    """Work goes in rounds of p microbatches through one chunk, then the same microbatches
    through the next chunk: the k-th forward of a rank is chunk (k // p) % v of microbatch
    (k // (p v)) p + k % p, and the backwards walk the chunks in reverse. That is why the
    number of microbatches must be a multiple of p."""
    def nth(k: int, kind: str) -> Action:
        chunk = (k // p) % v
        if kind == B:
            chunk = v - 1 - chunk
        return Action(kind, chunk * p + r, (k // (p * v)) * p + k % p)

    total = m * v
    # enough forwards in flight that the first backward finds this rank's chunks filled
    warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
    order = [nth(k, F) for k in range(warmup)]
    for k in range(total - warmup):
        order += [nth(warmup + k, F), nth(k, B)]
    return order + [nth(k, B) for k in range(total - warmup, total)]


def zero_bubble_order(r: int, p: int, m: int) -> list[Action]:
    order = []
    for a in one_f_one_b_order(r, p, m):
        if a.kind == F:
            order.append(a)
        else:
            order.append(Action(I, r, a.microbatch))
            if a.microbatch >= r:  # rank r runs W r steps after its I
                order.append(Action(W, r, a.microbatch - r))
    return order + [Action(W, r, i) for i in range(max(m - r, 0), m)]


SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zero_bubble": zero_bubble,
}


def check(pp_rank: int, pp_size: int, n_microbatches: int, n_virtual: int, name: str) -> None:
    """One clear error per bad argument, naming the fix."""
    if pp_size < 1:
        raise ValueError(f"pp size must be >= 1, got {pp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp rank {pp_rank} is outside 0..{pp_size - 1}")
    if n_microbatches < 1:
        raise ValueError(f"the number of microbatches must be >= 1, got {n_microbatches}")
    if name == "interleaved_1f1b":
        if n_virtual < 2:
            raise ValueError(f"interleaved_1f1b needs >= 2 virtual stages per rank, got {n_virtual}: "
                             "pass --virtual 2 (or use the 1f1b schedule)")
        if n_microbatches % pp_size:
            raise ValueError(f"interleaved_1f1b sends microbatches through each chunk in rounds of pp={pp_size}, "
                             f"so the microbatches ({n_microbatches}) must be a multiple of {pp_size}")
    elif n_virtual != 1:
        raise ValueError(f"{name} runs one stage per rank, got {n_virtual} virtual stages: "
                         "use interleaved_1f1b for more, or set virtual to 1")


# ---------------------------------------------------------------- timing


class Slot(NamedTuple):
    action: Action
    start: float
    end: float


def time_compute(orders: list[list[Action]], costs: dict[str, float] = COSTS) -> list[list[Slot]]:
    """Start every compute action as soon as its rank is free and its inputs exist:
        F of stage s, microbatch m   after F of stage s-1, m
        B (or I) of stage s, m       after F of s, m and B (or I) of stage s+1, m
        W of stage s, m              after I of s, m
    Raises DeadlockError when the ranks' orders wait on each other in a cycle."""
    n_stages = 1 + max((a.stage for order in orders for a in order), default=0)
    end: dict[tuple[str, int, int], float] = {}
    rows: list[list[Slot]] = [[] for _ in orders]
    progress = True
    while progress:
        progress = False
        for order, row in zip(orders, rows):
            while len(row) < len(order):
                a = order[len(row)]
                needs = _dependencies(a, n_stages)
                if not all(n in end for n in needs):
                    break
                start = max([row[-1].end if row else 0.0] + [end[n] for n in needs])
                row.append(Slot(a, start, start + costs[a.kind]))
                end[(a.kind, a.stage, a.microbatch)] = start + costs[a.kind]
                progress = True
    stuck = [f"rank {r} at {order[len(row)]}" for r, (order, row) in enumerate(zip(orders, rows))
             if len(row) < len(order)]
    if stuck:
        raise DeadlockError("compute deadlock, every rank waits: " + ", ".join(stuck))
    return rows


def _dependencies(a: Action, n_stages: int) -> list[tuple[str, int, int]]:
    s, m = a.stage, a.microbatch
    if a.kind == F:
        return [(F, s - 1, m)] if s > 0 else []
    if a.kind == W:
        return [(I, s, m)]
    # B waits for B of the next stage, I for I (a schedule splits all of its backwards or none)
    return [(F, s, m)] + ([(a.kind, s + 1, m)] if s < n_stages - 1 else [])


# ---------------------------------------------------------------- messages


def add_communication(orders: list[list[Action]], pp_rank: int) -> list[Action]:
    """Rank pp_rank's compute order with its messages inserted.

    Time all ranks' orders with unit costs. Every message then has a moment: the end of the
    compute that makes it. The sender posts it right after that compute; the receiver posts
    it at its first pause between computes at or after that moment. Messages posted in one
    pause form one batch (one batch_isend_irecv). Sorting each rank's posts by this one clock
    is what makes it deadlock-free: a batch only waits for partners posted at the same moment
    or earlier, and those never wait for it (simulate.check_communication verifies it). Each
    link also carries its messages in the same order at both ends, which NCCL requires.
    No message goes between two stages on the same rank (pp_size 1)."""
    pp_size = len(orders)
    rows = time_compute(orders)
    n_stages = 1 + max((a.stage for order in orders for a in order), default=0)
    sends_after: dict[int, Action] = {}  # index of my compute -> the message it makes
    recvs_before: dict[int, list[tuple[float, Action]]] = {}  # index of my compute -> messages to post before it
    for r, row in enumerate(rows):
        for index, slot in enumerate(row):
            message = _message_out(slot.action, n_stages)
            if message is None:
                continue
            other, recv = peer(message, pp_size)
            if other == r:
                continue
            if r == pp_rank:
                sends_after[index] = message
            if other == pp_rank:
                pause = sum(s.start < slot.end for s in rows[pp_rank])  # computes that start before it exists
                recvs_before.setdefault(pause, []).append((slot.end, recv))
    out = []
    for i, a in enumerate(orders[pp_rank] + [None]):
        out += [recv for _, recv in sorted(recvs_before.get(i, []))]
        if a is not None:
            out.append(a)
            if i in sends_after:
                out.append(sends_after[i])
    return out


def _message_out(a: Action, n_stages: int) -> Action | None:
    """What a compute action sends: F its activation forward, B or I the input gradient back."""
    if a.kind == F and a.stage < n_stages - 1:
        return Action(SEND_F, a.stage, a.microbatch)
    if a.kind in (B, I) and a.stage > 0:
        return Action(SEND_B, a.stage, a.microbatch)
    return None


def peer(action: Action, pp_size: int) -> tuple[int, Action]:
    """The rank at the other end of a message, and the action it posts for it."""
    s, mb = action.stage, action.microbatch
    other = {SEND_F: (RECV_F, s + 1), RECV_F: (SEND_F, s - 1), SEND_B: (RECV_B, s - 1), RECV_B: (SEND_B, s + 1)}
    kind, stage = other[action.kind]
    return stage_rank(stage, pp_size), Action(kind, stage, mb)


def compute_only(actions: list[Action]) -> list[Action]:
    return [a for a in actions if a.kind in COMPUTE]

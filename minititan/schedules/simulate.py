"""Run schedules on paper: a timeline per rank, the bubble, and deadlock checks.

    timeline = simulate_schedule("1f1b", pp=4, microbatches=8)
    timeline.bubble            # idle time / (ranks * makespan), 3/11 here

`simulate` takes any ranks' action lists. Compute actions cost COSTS units (F 1, B 2 = I 1 +
W 1) and start as soon as their rank is free and their inputs exist (schedule.time_compute).
Messages cost nothing in the timeline; they are checked separately, under the strictest rule
a backend may apply (NCCL's, when all of a rank's P2P share one stream): the messages between
two computes are posted as one batch that finishes only when every partner is posted too,
and each link delivers in the order things were sent.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from .schedule import (COMMUNICATION, COSTS, SCHEDULES, Action, DeadlockError, F, I, Slot, W, compute_only, peer,
                       stage_rank, time_compute)


class Timeline(NamedTuple):
    rows: list[list[Slot]]  # per rank, compute actions in execution order
    makespan: float
    bubble: float  # idle / (ranks * makespan)


def simulate(rank_actions: list[list[Action]], costs: dict[str, float] | None = None) -> Timeline:
    """Check the messages, then time every rank's compute actions. Raises DeadlockError."""
    check_communication(rank_actions)
    rows = time_compute([compute_only(a) for a in rank_actions], {**COSTS, **(costs or {})})
    makespan = max((row[-1].end for row in rows if row), default=0.0)
    busy = sum(s.end - s.start for row in rows for s in row)
    bubble = 1.0 - busy / (len(rows) * makespan) if makespan else 0.0
    return Timeline(rows, makespan, bubble)


def simulate_schedule(schedule: str, pp: int, microbatches: int, virtual: int = 1,
                      costs: dict[str, float] | None = None) -> Timeline:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return simulate([SCHEDULES[schedule](r, pp, microbatches, virtual) for r in range(pp)], costs)


def check_communication(rank_actions: list[list[Action]]) -> None:
    """Every message has exactly one partner, each link carries its messages in the same
    order at both ends, and posting the batches (waiting at each for all of its partners to
    be posted) finishes. Raises DeadlockError naming what is wrong."""
    pp = len(rank_actions)
    _check_partners_and_order(rank_actions)
    batches = [_batches(actions) for actions in rank_actions]
    posted: set[Action] = set()
    position = [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while position[r] < len(batches[r]):
                batch = batches[r][position[r]]
                posted.update(batch)
                if not all(peer(a, pp)[1] in posted for a in batch):
                    break
                position[r] += 1
                progress = True
    stuck = [f"rank {r} at {[str(a) for a in batches[r][position[r]]]}" for r in range(pp)
             if position[r] < len(batches[r])]
    if stuck:
        raise DeadlockError("communication deadlock: " + "; ".join(stuck))


def _batches(actions: list[Action]) -> list[list[Action]]:
    """Runs of adjacent messages: what the runtime posts with one batch_isend_irecv."""
    out, run = [], []
    for a in actions + [None]:
        if a is not None and a.kind in COMMUNICATION:
            run.append(a)
        elif run:
            out.append(run)
            run = []
    return out


def _check_partners_and_order(rank_actions: list[list[Action]]) -> None:
    pp = len(rank_actions)
    counts = [Counter(actions) for actions in rank_actions]
    sent: dict[tuple[int, int], list[Action]] = {}  # (from rank, to rank) -> receives, in send order
    received: dict[tuple[int, int], list[Action]] = {}
    for r, actions in enumerate(rank_actions):
        for a in actions:
            if a.kind not in COMMUNICATION:
                continue
            if stage_rank(a.stage, pp) != r:
                raise DeadlockError(f"rank {r} posts {a} for a stage it does not hold")
            other, partner = peer(a, pp)
            if counts[r][a] != 1 or counts[other][partner] != 1:
                raise DeadlockError(f"{a} on rank {r} needs exactly one {partner} on rank {other}")
            if a.kind.startswith("SEND"):
                sent.setdefault((r, other), []).append(partner)
            else:
                received.setdefault((other, r), []).append(a)
    for link in sent.keys() | received.keys():
        if sent.get(link) != received.get(link):
            raise DeadlockError(f"rank {link[0]} sends to rank {link[1]} in another order than it receives: "
                                f"{[str(a) for a in sent.get(link, [])]} vs {[str(a) for a in received.get(link, [])]}")


# ---------------------------------------------------------------- textbook bubbles


def textbook_bubble(schedule: str, pp: int, microbatches: int, virtual: int = 1,
                    costs: dict[str, float] | None = None) -> float:
    """The closed-form bubble fraction idle / (idle + work), F I W the costs:

      gpipe, 1f1b        (p-1) / (m + p-1)          fill and drain: p-1 steps of F+B
      interleaved_1f1b   (p-1) / (v m + p-1)        Megatron: the fill is one chunk (1/v of
                                                    a stage) deep, the work v chunks per mb
      zero_bubble        (p-1)(F+I-W) / (m(F+I+W) + (p-1)(F+I-W))
                                                    ZB-H1: W fills all but F+I-W of each of
                                                    the p-1 fill steps; with F = I = W that
                                                    is a third of 1F1B's idle time (m >= p)
    """
    c = {**COSTS, **(costs or {})}
    p, m, v = pp, microbatches, virtual
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zero_bubble":
        idle = (p - 1) * (c[F] + c[I] - c[W])
        return idle / (m * (c[F] + c[I] + c[W]) + idle)
    raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")

"""Split one backward in two, for zero-bubble schedules: the input gradient now (I), the
weight gradients later (W).

    input_grad, backward_weight = backward_input(output, output_grad, input)
    ...                                       # other work: the previous stage has input_grad
    backward_weight()                         # now the weights' .grad get their share

Autograd computes only what it is asked for: asking for the input's gradient alone runs the
chain of activation gradients and skips every matmul's weight gradient. The skipped work
hangs off that chain at *frontier* nodes: nodes on the input's path with an edge into a
subgraph that leads only to weights (x @ W.T's node, with edges to x's path and to W). During
I a hook keeps the gradient arriving at each frontier node. W re-enters each frontier node
with it, asking only for its weight edges (so a matmul node computes just dW), and then runs
all the weight subgraphs into .grad with one backward (so a gather or a cast in there runs
once). Nothing on the input's path is computed twice; the price is that the whole graph
stays alive from I to W.

Re-entering frontier node N must not walk anything but N: autograd runs every node from
which a requested edge is reachable. So none of N's weight children may be reachable from
N's other children (tied weights: the same W used by two matmuls, one below the other).
Weights that share a node are fine otherwise: FSDP's gather, one node making all of a unit's
weights, is reached from each weight's own frontier node but from no other child of it.

Two kinds of graph are not split (backward_input then runs the whole backward and
backward_weight does nothing; the gradients are right either way):
  * a weight child of a frontier node is reachable from another child (tied weights);
  * a frontier node is a custom autograd.Function (a torch.compile'd region is one): it
    computes all of its gradients whenever it runs, so W would redo its whole backward.
Activation checkpointing must be non-reentrant (use_reentrant=False) to be split.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

Node = object  # an autograd graph node (torch.autograd.graph.Node)


def backward_input(output: Tensor, output_grad: Tensor | None, input: Tensor) -> tuple[Tensor, Callable[[], None]]:
    """Gradient of `input` (a leaf that requires grad) now; a function that accumulates the
    weight gradients into .grad later. output_grad is None for a scalar loss."""
    frontier = frontier_nodes(output, input)
    if frontier is None:
        torch.autograd.backward(output, output_grad)
        return _grad_or_zeros(input.grad, input), _nothing
    arriving: dict[Node, tuple[Tensor | None, ...]] = {}
    hooks = [node.register_prehook(_keeper(arriving, node)) for node in frontier]
    try:
        (input_grad,) = torch.autograd.grad(output, input, output_grad, retain_graph=True, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()

    def backward_weight() -> None:
        edges, grads = [], []
        for node, weight_edges in frontier.items():
            given = [(GradientEdge(node, k), g) for k, g in enumerate(arriving.get(node, ())) if g is not None]
            if not given:
                continue
            into = [GradientEdge(child, nr) for child, nr in weight_edges]
            got = torch.autograd.grad([e for e, _ in given], into, [g for _, g in given], allow_unused=True)
            edges += [e for e, g in zip(into, got) if g is not None]
            grads += [g for g in got if g is not None]
        if edges:
            torch.autograd.backward(edges, grads)

    return _grad_or_zeros(input_grad, input), backward_weight


def frontier_nodes(output: Tensor, input: Tensor) -> dict[Node, list[tuple[Node, int]]] | None:
    """Nodes on the input's path -> their edges into weight-only subgraphs; None when the
    graph should not be split (see the module docstring)."""
    if output.grad_fn is None:
        return None
    order = _children_first(output.grad_fn)
    on_input_path: dict[Node, bool] = {}
    for node in order:
        on_input_path[node] = getattr(node, "variable", None) is input or any(
            on_input_path[child] for child, _ in node.next_functions if child is not None)
    bit, reachable = _shared_reachable(order)
    frontier = {}
    for node in order:
        if not on_input_path[node]:
            continue
        weight_edges = [(c, nr) for c, nr in node.next_functions if c is not None and not on_input_path[c]]
        if not weight_edges:
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return None
        for weight_child, _ in weight_edges:
            others = [c for c, _ in node.next_functions if c is not None and c is not weight_child]
            if any(reachable[c] & bit.get(weight_child, 0) for c in others):
                return None
        frontier[node] = weight_edges
    return frontier


def _shared_reachable(order: list[Node]) -> tuple[dict[Node, int], dict[Node, int]]:
    """A bit for each node with several parents (only such a node can be reached from two
    children of one node), and for each node the mask of those it can reach, itself included."""
    parents: dict[Node, int] = {}
    for node in order:
        for child in {c for c, _ in node.next_functions if c is not None}:
            parents[child] = parents.get(child, 0) + 1
    bit = {node: 1 << i for i, node in enumerate(n for n in order if parents.get(n, 0) > 1)}
    reachable: dict[Node, int] = {}
    for node in order:  # children first
        mask = bit.get(node, 0)
        for child, _ in node.next_functions:
            if child is not None:
                mask |= reachable[child]
        reachable[node] = mask
    return bit, reachable


def _children_first(*roots: Node) -> list[Node]:
    """All nodes reachable from roots, each after every node it points to (no recursion:
    a deep model has thousands of nodes)."""
    order, seen, stack = [], set(), [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack += [(c, False) for c, _ in node.next_functions if c is not None and c not in seen]
    return order


def _keeper(arriving: dict, node: Node):
    def keep(grad_outputs):
        arriving[node] = grad_outputs
    return keep


def _grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else torch.zeros_like(like)


def _nothing() -> None:
    pass

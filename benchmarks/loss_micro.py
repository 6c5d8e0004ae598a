"""Time the eager loss (forward + backward from bf16 logits) three ways, and its peak extra memory.

    python benchmarks/loss_micro.py [tokens] [vocab]      # default 8192 x 128256 on CUDA, 2048 x 32768 on CPU

  upcast       F.cross_entropy(logits.float()): the textbook line; fp32 logits, their log-softmax and
               their gradient each exist whole
  checkpointed the same per chunk of 2048 tokens under torch.utils.checkpoint (recomputes the softmax)
  minititan    model.cross_entropy_sum's eager path: the gradient is computed in the forward, chunk by chunk
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minititan.core import model

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else (8192 if cuda else 2048)
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else (128256 if cuda else 32768)
CHUNK = model.LOSS_CHUNK_TOKENS


def upcast(logits, labels):
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def checkpointed(logits, labels):
    return sum(checkpoint(upcast, lg, lb, use_reentrant=False)
               for lg, lb in zip(logits.split(CHUNK), labels.split(CHUNK)))


def minititan(logits, labels):
    return model.CrossEntropyGradInForward.apply(logits, labels)


def sync():
    if cuda:
        torch.cuda.synchronize()


def measure(loss_fn, logits, labels, repeats=5):
    for _ in range(2):
        loss_fn(logits, labels).backward()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    for _ in range(repeats):
        logits.grad = None
        loss_fn(logits, labels).backward()
    sync()
    ms = (time.perf_counter() - start) / repeats * 1e3
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return ms, extra


def main():
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    reference = upcast(logits, labels)
    print(f"{tokens} tokens x {vocab} vocab, bf16 logits, {device}")
    for fn in (upcast, checkpointed, minititan):
        ms, extra = measure(fn, logits, labels)
        err = abs(fn(logits, labels).item() - reference.item()) / reference.item()
        print(f"  {fn.__name__:13s} {ms:8.2f} ms   peak extra {extra:6.2f} GiB   rel. loss diff {err:.1e}")


if __name__ == "__main__":
    main()

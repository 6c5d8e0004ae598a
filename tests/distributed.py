"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Each rank is forked from a server process that imported torch and minititan once (a fresh
interpreter would import them again for every rank of every test), with the caller's
environment variables as they are at the call.

    results = run_ranks(4, my_fn, arg)   # my_fn(rank, world_size, arg) on every rank

`my_fn` must be importable (defined at module level in a test file). Tensors in the results come
back on the CPU. A rank that raises makes run_ranks raise with that rank's traceback; a rank
that hangs is killed after `timeout` seconds.
"""
from __future__ import annotations

import io
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, environ, fn, args, queue):
    os.environ.clear()  # the caller's environment now, not the one the fork server started with
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=init_file[1])
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file[0]}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()  # tensors as bytes: shared-memory handles die with the rank's process
        torch.save(out, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_CONTEXT = mp.get_context("forkserver")  # a fresh interpreter per rank: seconds of imports on 2 cores
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "minititan.train", "tests.harness"])


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0) -> list:
    queue = _CONTEXT.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = (os.path.join(tmp, "init"), _free_port())
        procs = [_CONTEXT.Process(target=_worker, args=(r, world_size, init_file, dict(os.environ), fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = [None] * world_size, []
        try:
            for _ in range(world_size):
                rank, status, out = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(out), weights_only=False)
                else:
                    errors.append(f"rank {rank}:\n{out}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("\n".join(errors))
    return results

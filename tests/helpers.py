"""Helpers shared by the tests: run a function on N gloo workers, pick free ports, build tiny checkpoints.

    from helpers import run_workers
    results = run_workers(fn, world_size=4, args=(x,))   # fn(rank, world_size, *args) -> picklable

Workers are forked (cheap: no second torch import; spawned instead once this process has used CUDA) and call
torch.set_num_threads(1) before anything else, since a forked child that inherits torch's thread pool can hang.
Each run gets its own free port.
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; we release it just before gloo binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, outdir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report the worker's traceback to the test instead of a bare exit code
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, args: tuple = (), timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` forked gloo processes; return their results by rank."""
    with tempfile.TemporaryDirectory() as outdir:
        # fork is cheap (no second torch import), but a child forked after the parent touched CUDA (GPU tests earlier
        # in the same pytest run) cannot use torch's CUDA state at all: spawn fresh interpreters then
        method = "spawn" if torch.cuda.is_initialized() else "fork"
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, outdir), nprocs=world_size,
                                 join=False, start_method=method)
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessRaisedException:
            pass  # the worker saved its traceback; report it below
        except mp.ProcessExitedException:
            pass
        results = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"worker {rank} of {world_size} died without a result")
            saved = torch.load(path, weights_only=False)
            if not saved["ok"]:
                raise RuntimeError(f"worker {rank} of {world_size} failed:\n{saved['error']}")
            results.append(saved["result"])
        return results

"""Spawning processes that rendezvous: ``free_port()``, a free TCP port on localhost;
``launcher(world_size)``, the command prefix that runs a script in one process or under torchrun; and
``spawn_ranks`` / ``process_group``, the check scripts' W local processes and their group."""

import contextlib
import os
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(world_size: int) -> list[str]:
    """``[python]`` for one process; ``[python, -m, torch.distributed.run, ...]`` for W > 1 on a free port."""
    if world_size == 1:
        return [sys.executable]
    port = free_port()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world_size}",
        f"--master_port={port}",
    ]


def _rank(rank: int, worker: Callable, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    worker(rank, args)


def spawn_ranks(worker: Callable, args, world: int, name: str) -> None:
    """Run ``worker(rank, args)`` (a module-level function: it is pickled) in ``world`` processes that
    rendezvous on a free localhost port, one CPU thread each; a failed rank raises here. Then print
    ``{name}: all {world} ranks OK``."""
    mp.spawn(_rank, args=(worker, args, free_port()), nprocs=world, join=True)
    print(f"{name}: all {world} ranks OK")


@contextlib.contextmanager
def process_group(backend: str, rank: int, world: int):
    """The default process group for the body; on success every rank waits for the others before
    tearing down (gloo aborts a rank whose peer is gone while it still talks)."""
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()

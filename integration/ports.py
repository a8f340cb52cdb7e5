"""Spawning processes that rendezvous: ``free_port()``, a free TCP port on localhost, and
``launcher(world_size)``, the command prefix that runs a script in one process or under torchrun."""

import socket
import sys


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

"""``fake``: W expert-parallel ranks simulated by W threads of one process, for tests.

Each rank runs the unmodified EP code in its own thread; the all-to-all meets at a barrier and swaps
tensors through a shared mailbox. Deterministic: what each rank receives depends only on the data.

Legend: S rows sent, R rows received, X any row width, W world size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from flashfusemoe.comm.alltoall import AllToAllCommunicator

__all__ = ["FakeCommunicator", "FakeGroup", "FakeWorld"]

R_ = TypeVar("R_")


class FakeWorld:
    """W simulated ranks. ``run(fn)`` calls ``fn(rank)`` on W threads and returns the W results."""

    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._mailbox: list[list[torch.Tensor] | None] = [None] * world_size

    def group(self, rank: int) -> FakeGroup:
        return FakeGroup(self, rank)

    def exchange(self, rank: int, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """``chunks[w]`` goes to rank w; returns the chunk each rank sent to ``rank``, by source."""
        self._mailbox[rank] = chunks
        self._barrier.wait()
        received = [self._mailbox[src][rank] for src in range(self.world_size)]
        self._barrier.wait()  # nobody refills the mailbox before all have read it
        return received

    def run(self, fn: Callable[[int], R_]) -> list[R_]:
        results: list = [None] * self.world_size
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                self._barrier.abort()  # wake the other ranks instead of letting them wait out the timeout

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier.reset()
        if errors:  # report the root cause, not the ranks it woke with BrokenBarrierError
            real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
            raise (real or errors)[0]
        return results


@dataclass(frozen=True)
class FakeGroup:
    """One rank's view of a :class:`FakeWorld`, passed where a process group would be."""

    world: FakeWorld
    rank: int

    def size(self) -> int:
        return self.world.world_size


class FakeCommunicator(AllToAllCommunicator):
    """Packed all-to-all between the threads of a :class:`FakeWorld`."""

    def __init__(self, group: FakeGroup | None = None) -> None:
        if not isinstance(group, FakeGroup):
            raise TypeError(
                f"communicator 'fake' needs group=FakeWorld(W).group(rank), got {type(group).__name__}"
            )
        self.world, self.rank, self.world_size = group.world, group.rank, group.size()

    def all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...]
    ) -> torch.Tensor:
        received = self.world.exchange(self.rank, list(send_SX.split(list(send_splits))))
        got = tuple(r.shape[0] for r in received)
        if got != tuple(recv_splits):
            raise RuntimeError(f"rank {self.rank}: expected {recv_splits} rows by source, got {got}")
        return torch.cat(received)

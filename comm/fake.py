"""``fake``: W expert-parallel ranks simulated by W threads of one process, for tests.

Each rank runs the unmodified EP code in its own thread, one rank at a time: a rank holds the world's
lock while it computes and gives it up only while it waits in an exchange. So what each rank receives
depends only on the data (deterministic), and code that is not thread-safe (Triton's CPU interpreter)
never runs on two ranks at once. A rank that leaves ``run`` while the others wait in an exchange, or
that enters a different exchange than they did, is reported at once, by rank and step.

CPU tensors only: on CUDA tensors autograd runs every rank's backward on one device thread, where a
rank waiting in a backward exchange would block the others' backwards.

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


class _PeerFailed(RuntimeError):
    """Raised in the ranks that a failing rank leaves waiting; ``run`` reports the failure itself."""


@dataclass
class _Round:
    what: str
    sent: list
    read: int = 0


class FakeWorld:
    """W simulated ranks. ``run(fn)`` calls ``fn(rank)`` on W threads, one at a time between exchanges,
    and returns the W results; the first exception of a rank is re-raised in the caller."""

    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be an int >= 1")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._cond = threading.Condition()
        self._local = threading.local()
        self._running = False

    def group(self, rank: int) -> FakeGroup:
        """Rank ``rank``'s group, to pass where a process group would go."""
        return FakeGroup(self, rank)

    def exchange(self, rank: int, chunks: list[torch.Tensor], what: str = "exchange") -> list[torch.Tensor]:
        """``chunks[w]`` goes to rank w; returns the chunk each rank sent to ``rank``, by source."""
        if getattr(self._local, "rank", None) != rank:
            raise RuntimeError(
                f"FakeWorld rank {rank} called {what!r} outside FakeWorld.run (or from another rank's "
                "thread): a fake communicator only works inside world.run(fn), on fn's own rank"
            )
        W = self.world_size
        with self._cond:
            n = self._calls[rank]
            self._calls[rank] += 1
            box = self._rounds.setdefault(n, _Round(what, [None] * W))
            if box.what != what:
                raise RuntimeError(
                    f"FakeWorld: rank {rank} entered {what!r} as exchange #{n}, where other ranks are in "
                    f"{box.what!r}: the ranks run different collectives"
                )
            box.sent[rank] = chunks
            self._cond.notify_all()

            def missing() -> list[int]:
                return [r for r in range(W) if box.sent[r] is None]

            def settled() -> bool:
                return not missing() or self._failed or any(self._done[r] for r in missing())

            if not self._cond.wait_for(settled, timeout=self.timeout_s):
                raise RuntimeError(
                    f"FakeWorld: rank {rank} waited {self.timeout_s:g} s in exchange #{n} ({what!r}) for "
                    f"ranks {missing()}"
                )
            if missing():
                if self._failed:
                    raise _PeerFailed(f"rank {rank}: another rank failed")
                gone = [r for r in missing() if self._done[r]]
                raise RuntimeError(
                    f"FakeWorld: rank(s) {gone} returned from fn without joining exchange #{n} ({what!r}), "
                    f"where rank {rank} waits: every rank must run the same collectives"
                )
            received = [box.sent[src][rank] for src in range(W)]
            box.read += 1
            if box.read == W:
                del self._rounds[n]
            return received

    def run(self, fn: Callable[[int], R_]) -> list[R_]:
        """``[fn(0), ..., fn(W-1)]``, each on its own thread."""
        if self._running:
            raise RuntimeError(
                "FakeWorld.run is already running (nested or concurrent runs are not supported)"
            )
        W = self.world_size
        self._running, self._failed = True, False
        self._rounds: dict[int, _Round] = {}
        self._calls, self._done = [0] * W, [False] * W
        results: list = [None] * W
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            self._local.rank = rank
            with self._cond:  # held while computing; given up only while waiting in an exchange
                try:
                    results[rank] = fn(rank)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(exc)
                    self._failed = True
                finally:
                    self._done[rank] = True
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), name=f"fake-rank-{r}") for r in range(W)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self._running = False
        if errors:  # the root cause, not the ranks it woke
            raise next((e for e in errors if not isinstance(e, _PeerFailed)), errors[0])
        return results


@dataclass(frozen=True)
class FakeGroup:
    """One rank's view of a :class:`FakeWorld`, passed where a process group would be."""

    world: FakeWorld
    rank: int

    def __post_init__(self) -> None:
        if not isinstance(self.world, FakeWorld):
            raise TypeError(f"world must be a FakeWorld, got {type(self.world).__name__}")
        W = self.world.world_size
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 <= self.rank < W:
            raise ValueError(f"rank={self.rank!r} must be an int in [0, world_size={W})")

    def size(self) -> int:
        return self.world.world_size


class FakeCommunicator(AllToAllCommunicator):
    """Packed all-to-all between the threads of a :class:`FakeWorld` (CPU tensors).

    ``sync_free=True``: worst-case buffers, no counts exchange (see :mod:`flashfusemoe.comm.alltoall`)."""

    def __init__(self, group: FakeGroup | None = None, *, sync_free: bool = False) -> None:
        if not isinstance(group, FakeGroup):
            raise TypeError(
                f"communicator 'fake' needs group=FakeWorld(W).group(rank), got {type(group).__name__}"
            )
        if not isinstance(sync_free, bool):
            raise TypeError(f"sync_free must be a bool, got {type(sync_free).__name__}")
        self.world, self.rank, self.world_size = group.world, group.rank, group.size()
        self.sync_free = sync_free

    def _all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], what: str
    ) -> torch.Tensor:
        if send_SX.device.type != "cpu":
            raise ValueError(
                f"communicator 'fake' moves CPU tensors only, got {send_SX.device} (on CUDA, autograd runs "
                "all ranks' backwards on one thread; use gloo processes there)"
            )
        received = self.world.exchange(self.rank, list(send_SX.split(list(send_splits))), what)
        got = tuple(r.shape[0] for r in received)
        if got != tuple(recv_splits):
            raise RuntimeError(
                f"rank {self.rank}, {what}: expected {recv_splits} rows by source, got {got}"
                + (" (sync_free needs the same number of tokens on every rank)" if self.sync_free else "")
            )
        return torch.cat(received)

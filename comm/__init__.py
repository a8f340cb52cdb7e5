"""Expert-parallel communicators and their registry.

Built in: ``loopback`` (EP = 1, zero-copy), ``fake`` (W ranks as threads of one process, for tests),
``nccl`` (packed all-to-all over torch.distributed; gloo works too), ``deepep`` (DeepEP's kernels;
chosen by name only). ``register_communicator`` adds
more. Selection: explicit name > ``FLASHFUSEMOE_COMM`` (a registered name or ``module:Class``) > auto
(``fake`` for a FakeGroup, ``nccl`` for a torch.distributed group of more than one rank, else
``loopback``). The communicator built must span the group: its world size is checked against the
group's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from flashfusemoe import _env
from flashfusemoe.comm.alltoall import AllToAllCommunicator, AllToAllHandle
from flashfusemoe.comm.base import Communicator, Dispatched
from flashfusemoe.comm.deepep import DeepEPCommunicator
from flashfusemoe.comm.fake import FakeCommunicator, FakeGroup, FakeWorld
from flashfusemoe.comm.loopback import LoopbackCommunicator, LoopbackHandle
from flashfusemoe.comm.nccl import NcclCommunicator

__all__ = [
    "AllToAllCommunicator",
    "AllToAllHandle",
    "Communicator",
    "DeepEPCommunicator",
    "Dispatched",
    "FakeCommunicator",
    "FakeGroup",
    "FakeWorld",
    "LoopbackCommunicator",
    "LoopbackHandle",
    "NcclCommunicator",
    "all_reduce_sum",
    "available_communicators",
    "get_communicator",
    "group_size",
    "register_communicator",
]

Factory = Callable[[object], Communicator]
_FACTORIES: dict[str, Factory] = {
    "loopback": LoopbackCommunicator,
    "fake": FakeCommunicator,
    "nccl": NcclCommunicator,
    "deepep": DeepEPCommunicator,  # imports deep_ep when built, never at import
}


def register_communicator(name: str, factory: Factory) -> None:
    """Make ``factory(group) -> Communicator`` selectable as ``name`` (replaces an earlier one)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"communicator name {name!r} must be a non-empty str without ':'")
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(group) -> Communicator, got {factory!r}")
    _FACTORIES[name] = factory


def available_communicators() -> list[str]:
    """Registered communicator names."""
    return sorted(_FACTORIES)


def group_size(group: object | None, name: str = "ep_group") -> int:
    """Ranks of a group: a torch.distributed ProcessGroup, a FakeGroup, or None (the default
    torch.distributed group when initialized, else a world of one); else a TypeError naming ``name``."""
    if isinstance(group, FakeGroup):
        return group.size()
    if group is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return dist.get_world_size(group)
    raise TypeError(
        f"{name} must be a torch.distributed ProcessGroup, a FakeGroup or None, got {type(group).__name__}"
    )


class _Done:
    """A finished collective (the fake transport reduces synchronously)."""

    def wait(self) -> None:
        pass


def all_reduce_sum(buf: torch.Tensor, group: object | None, what: str, async_op: bool = False):
    """Sum ``buf`` over the ranks of ``group`` (as ``group_size``), in place. ``async_op``: start it and
    return something with ``wait()``; else return when torch.distributed has it in stream order (no
    host sync on NCCL). ``what`` names the collective in a fake world's errors."""
    if isinstance(group, FakeGroup):  # a copy travels: the peers read it after this rank sums in place
        parts = group.world.exchange(group.rank, [buf.clone()] * group.size(), what)
        buf.copy_(torch.stack(parts).sum(0))
        return _Done() if async_op else None
    return dist.all_reduce(buf, group=group, async_op=async_op)


def _resolve(name: str) -> Factory:
    if name in _FACTORIES:
        return _FACTORIES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"communicator {name!r} cannot be loaded: {exc}") from exc
    raise ValueError(
        f"communicator {name!r} is unknown; available: {available_communicators()} "
        "(or 'module:Class' for your own)"
    )


def _auto(group: object | None) -> Factory:
    if isinstance(group, FakeGroup):
        return FakeCommunicator
    return NcclCommunicator if group_size(group) > 1 else LoopbackCommunicator


def get_communicator(name: str | Communicator | None = None, group: object | None = None) -> Communicator:
    """A communicator spanning ``group`` (a torch.distributed group, a FakeGroup, or None).

    ``name``: a registered name, ``module:Class``, a Communicator instance (used as it is), or None
    (``FLASHFUSEMOE_COMM``, then auto). Raises if the communicator's world size is not the group's."""
    W = group_size(group)
    if isinstance(name, Communicator):
        comm = name
    else:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"communicator must be a name, a Communicator or None, got {type(name).__name__}")
        name = name or _env.comm_from_env()
        factory = _resolve(name) if name is not None else _auto(group)
        comm = factory(group)
        if not isinstance(comm, Communicator):
            raise TypeError(f"communicator {name!r} built a {type(comm).__name__}, not a Communicator")
    if comm.world_size != W:
        raise ValueError(
            f"communicator {type(comm).__name__} spans {comm.world_size} rank(s) but the EP group has {W}: "
            "every rank would keep the wrong experts"
        )
    return comm

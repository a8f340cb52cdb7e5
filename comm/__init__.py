"""Expert-parallel communicators and their registry.

Built in: ``loopback`` (EP = 1), ``fake`` (W ranks as threads of one process, for tests), ``nccl``
(packed all-to-all over torch.distributed; gloo works too). ``register_communicator`` adds more.
Selection: explicit name > ``FLASHFUSEMOE_COMM`` (a registered name or ``module:Class``) > auto
(``fake`` for a FakeGroup, ``loopback`` for a group of one or no initialized torch.distributed,
``nccl`` otherwise).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.distributed as dist

from flashfusemoe import _env
from flashfusemoe.comm.base import Communicator, Dispatched, DispatchHandle
from flashfusemoe.comm.fake import FakeCommunicator, FakeGroup, FakeWorld
from flashfusemoe.comm.loopback import LoopbackCommunicator
from flashfusemoe.comm.nccl import NcclCommunicator

__all__ = [
    "Communicator",
    "DispatchHandle",
    "Dispatched",
    "FakeGroup",
    "FakeWorld",
    "available_communicators",
    "get_communicator",
    "register_communicator",
]

Factory = Callable[[object], Communicator]
_FACTORIES: dict[str, Factory] = {
    "loopback": LoopbackCommunicator,
    "fake": FakeCommunicator,
    "nccl": NcclCommunicator,
}


def register_communicator(name: str, factory: Factory) -> None:
    """Make ``factory(group) -> Communicator`` selectable as ``name`` (replaces an earlier one)."""
    if not name or ":" in name:
        raise ValueError(f"communicator name {name!r} must be non-empty and contain no ':'")
    _FACTORIES[name] = factory


def available_communicators() -> list[str]:
    """Registered communicator names."""
    return sorted(_FACTORIES)


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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return NcclCommunicator
    return LoopbackCommunicator


def get_communicator(name: str | None = None, group: object | None = None) -> Communicator:
    """A communicator for ``group`` (a torch.distributed group, a FakeGroup, or None)."""
    name = name or _env.comm_from_env()
    factory = _resolve(name) if name is not None else _auto(group)
    comm = factory(group)
    if not isinstance(comm, Communicator):
        raise TypeError(f"communicator {name!r} built a {type(comm).__name__}, not a Communicator")
    return comm

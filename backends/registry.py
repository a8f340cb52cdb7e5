"""The backend registry (a module of its own: the package namespace has a ``torch`` sub-package that
would shadow the ``torch`` library).

A backend is a module exposing ``NAME``, ``unavailable_reason(device) -> str | None``,
``router_logits``, ``route``, ``experts`` and ``expert_mlp`` with the contracts of
:mod:`flashfusemoe.backends.torch`, the reference (docs/fused_moe.md, "Backends").
Selection: explicit name > ``FLASHFUSEMOE_BACKEND`` > auto (the fastest one that loads for the device).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from flashfusemoe import _env

__all__ = ["available_backends", "get_backend", "preload"]

_BACKENDS: dict[str, str] = {
    "torch": "flashfusemoe.backends.torch",
    "triton": "flashfusemoe.backends.triton",
}
# Auto-selection preference per device type, fastest first (the Triton interpreter is never automatic).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch")}


def available_backends() -> list[str]:
    """Registered backend names (whether or not they can run here)."""
    return list(_BACKENDS)


_LOADED: dict[str, ModuleType] = {}  # a plain dict lookup: traceable by torch.compile, unlike an import


def _load(name: str, device: torch.device) -> tuple[ModuleType | None, str | None]:
    module = _LOADED.get(name)
    if module is None:
        try:
            module = importlib.import_module(_BACKENDS[name])
        except ImportError as exc:
            return None, f"cannot import: {exc}"
        _LOADED[name] = module
    reason = module.unavailable_reason(device)
    return (None, reason) if reason else (module, None)


def preload() -> None:
    """Import every backend that imports here, so that later selection needs no import (an import
    inside a ``torch.compile(fullgraph=True)`` region is a graph break). ``MoELayer`` calls it."""
    for name in _BACKENDS:
        _load(name, torch.device("cpu"))


def get_backend(name: str | None = None, device: torch.device | str | None = None) -> ModuleType:
    """The backend module to run on ``device``.

    An explicit ``name`` (or ``FLASHFUSEMOE_BACKEND``) that cannot run raises and says why; auto picks the
    first backend of the preference order that runs on ``device``.
    """
    device = torch.device(device if device is not None else "cpu")
    name = name or _env.backend_from_env()
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"backend={name!r} is unknown; available: {available_backends()}")
        module, reason = _load(name, device)
        if module is None:
            raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
        return module
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        module, _ = _load(candidate, device)
        if module is not None:
            return module
    raise AssertionError("the torch backend always loads")
